"""The latent cache: cached training batches equal on-the-fly encoding, stale or unfinished caches are refused,
an interrupted build resumes where it stopped, and the ``python -m lvdm.cache`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cut_like_the_cache
from safetensors import safe_open
from safetensors.torch import save_file

from lvdm.cache import encoders
from lvdm.config import DataConfig, config_from_dict
from lvdm.data.build import build_dataset
from lvdm.data.cache import LatentCache, build_cache, cache_fingerprint, collate_cached, weights_digest
from lvdm.data.dataset import VideoDataset
from lvdm.data.loader import BatchStream, make_loader
from lvdm.data.skip_log import SkipLog
from lvdm.errors import DataError
from lvdm.testing import clips, tiny_sd_components, tiny_vae
from lvdm.training.step import Frozen, batch_latents_and_text, step_generator

REPO = Path(__file__).resolve().parents[1]
SEED = 3
CACHED = 6  # of the clips c0..c7: c5 has no caption, c6 is a zero-byte file
SHARD = 3  # -> shards [c0 c1 c2] [c3 c4 c5] [c6 c7]


def data_config(root: Path, **fields: object) -> DataConfig:
    defaults = {"root": str(root), "num_frames": 4, "frame_stride": 2, "resolution": [16, 16], "flip": True}
    return config_from_dict(defaults | fields, DataConfig)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache_clips")
    for i in range(8):
        path = root / f"c{i}.mp4"
        if i == 6:
            path.write_bytes(b"")
        else:
            clips.write_clip(path, num_frames=12, size=(32, 24), seed=i)
        if i != 5:
            path.with_suffix(".txt").write_text(clips.caption_for(i), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def base() -> SimpleNamespace:
    """The tiny SD1 components where ``lvdm.cache.encoders`` and ``Frozen.from_base`` expect a loaded base."""
    return SimpleNamespace(**tiny_sd_components("sd1", seed=0))


def fingerprint(dataset: VideoDataset, base: SimpleNamespace) -> dict:
    return cache_fingerprint(
        dataset, vae_digest=weights_digest(base.vae), text_encoder_digest=weights_digest(base.text_encoder)
    )


def build(dataset: VideoDataset, base: SimpleNamespace, out: Path, **overrides) -> Path:
    kwargs = {**encoders(base), "fingerprint": fingerprint(dataset, base), "shard_size": SHARD, "progress": False}
    return build_cache(dataset, out, **(kwargs | overrides))


@pytest.fixture(scope="module")
def cached(folder: Path, base: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory):
    dataset, _ = build_dataset(data_config(folder), seed=SEED)
    return dataset, build(dataset, base, tmp_path_factory.mktemp("cache") / "latents")


def test_cached_batches_equal_on_the_fly_encoding(cached, base) -> None:
    dataset, out = cached
    cache = LatentCache(out, expected=fingerprint(dataset, base))
    assert len(cache) == CACHED and len(cache.groups) == 1
    frozen = Frozen.from_base(base)
    stream = BatchStream(cache, 3, seed=SEED)
    loader = make_loader(cache, stream, collate_fn=collate_cached)
    for n, (batch, _) in enumerate(zip(loader, range(3), strict=False)):
        assert batch["latents"].shape == (3, 2 * 4, 4, 8, 8)  # (b, 2c, f, h/2, w/2): the tiny VAE halves sizes
        video = cut_like_the_cache(dataset, batch["index"].tolist())
        assert batch["caption"] == video["caption"] and batch["source"] == video["source"]
        assert torch.equal(batch["fps"], video["fps"]) and torch.equal(batch["is_image"], video["is_image"])
        cpu = torch.device("cpu")
        latents, text = batch_latents_and_text(batch, frozen, step_generator(SEED, 0, n), cpu)
        expected_latents, expected_text = batch_latents_and_text(video, frozen, step_generator(SEED, 0, n), cpu)
        torch.testing.assert_close(latents, expected_latents, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.empty_text, frozen.empty_text[0])


def test_bad_files_are_listed_once_in_the_cache_skip_log(cached) -> None:
    _, out = cached
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(Path(row["path"]).name, row["reason"]) for row in rows] == [
        ("c5.mp4", "caption file missing: c5.txt"),
        ("c6.mp4", "zero-byte file"),
    ]


def test_a_stale_cache_is_refused_naming_what_differs(cached, folder, base, tmp_path: Path) -> None:
    dataset, out = cached
    longer, _ = build_dataset(data_config(folder, num_frames=5), seed=SEED)
    with pytest.raises(DataError, match=r"stale.*clip\.num_frames: 4 in the cache, 5 now"):
        LatentCache(out, expected=fingerprint(longer, base))
    other_vae = SimpleNamespace(vae=tiny_vae(seed=1), text_encoder=base.text_encoder)
    with pytest.raises(DataError, match=rf"stale.*vae: '{weights_digest(base.vae)}' in the cache, '\w+' now"):
        LatentCache(out, expected=fingerprint(dataset, other_vae))
    other_seed, _ = build_dataset(data_config(folder), seed=SEED + 1)
    with pytest.raises(DataError, match="started with other settings .*seed: 3 in the cache, 4 now"):
        build(other_seed, base, out)  # building into it with other settings is refused too
    with pytest.raises(DataError, match="does not exist"):
        LatentCache(tmp_path / "nothing")


def test_a_folder_that_is_not_a_cache_is_refused_and_left_as_it_is(cached, base, tmp_path: Path) -> None:
    """data.cache pointed at a user's folder replaced its empty_text.safetensors and appended to its skipped.jsonl;
    a FIFO as cache.json blocked the build forever; a cache.json that is not JSON or not a mapping was a traceback."""
    dataset, _ = cached
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "empty_text.safetensors").write_text("my file")
    with pytest.raises(DataError, match="holds files but no cache.json: not a latent cache"):
        build(dataset, base, mine)
    assert [p.name for p in mine.iterdir()] == ["empty_text.safetensors"]
    assert (mine / "empty_text.safetensors").read_text() == "my file"
    makers = {"fifo": os.mkfifo, "text": lambda p: p.write_text("not json"), "list": lambda p: p.write_text("[1]"),
              "deep": lambda p: p.write_text("[" * 100000)}  # fmt: skip
    for name, make in makers.items():
        folder = tmp_path / name
        folder.mkdir()
        make(folder / "cache.json")
        with pytest.raises(DataError, match="is not a latent cache"):
            build(dataset, base, folder)
        with pytest.raises(DataError, match="is not a latent cache|does not exist"):
            LatentCache(folder)
        assert [p.name for p in folder.iterdir()] == ["cache.json"]
    new = build(dataset, base, tmp_path / "new")  # the control: a new folder is built
    assert (new / "cache.json").is_file() and LatentCache(new)


class Interrupt(Exception):
    """Stands in for a kill in the middle of a build."""


def test_an_interrupted_build_resumes_at_the_missing_shard(cached, base, tmp_path: Path) -> None:
    dataset, complete = cached
    out = tmp_path / "latents"
    encode = encoders(base)["encode_video"]
    calls = []

    def dying(video: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == CACHED:  # c7, the last clip of the last shard (c6 before it is bad: logged first)
            raise Interrupt
        return encode(video)

    with pytest.raises(Interrupt):
        build(dataset, base, out, encode_video=dying)
    shards = sorted(out.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(DataError, match="incomplete: 1 of 3 shards missing \\(first: shard-00002.safetensors\\)"):
        LatentCache(out)
    written = {p.name: p.stat().st_mtime_ns for p in shards}
    build(dataset, base, out)
    assert {p.name: p.stat().st_mtime_ns for p in shards} == written  # finished shards are not rewritten
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{n}.safetensors" for n in range(3)]
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert read_shard(out / name) == read_shard(complete / name)
    assert (out / "skipped.jsonl").read_text() == (complete / "skipped.jsonl").read_text()  # c6 logged once


def test_files_mended_since_join_the_cache_when_it_is_built_again(folder, base, tmp_path: Path) -> None:
    """A clip replaced and a caption added after the build: building again into the finished cache adds their
    samples, and the cache then equals one built from scratch on the mended folder, shard for shard, to the byte;
    their rows leave the skip log. They joined only a cache built into a new folder before."""
    import shutil

    clips_copy = tmp_path / "clips"
    shutil.copytree(folder, clips_copy)
    dataset, _ = build_dataset(data_config(clips_copy), seed=SEED)
    out = build(dataset, base, tmp_path / "latents")
    shards = sorted(out.glob("shard-*.safetensors"))
    written = {p.name: p.stat().st_mtime_ns for p in shards}
    build(dataset, base, out)  # the control: nothing mended, nothing rewritten, both still logged
    assert {p.name: p.stat().st_mtime_ns for p in shards} == written
    assert len(LatentCache(out)) == CACHED and len(SkipLog(out / "skipped.jsonl").logged) == 2
    clips.write_clip(clips_copy / "c6.mp4", num_frames=12, size=(32, 24), seed=6)  # was a zero-byte file
    (clips_copy / "c5.txt").write_text(clips.caption_for(5), encoding="utf-8")  # was missing
    build(dataset, base, out)
    fresh = build(dataset, base, tmp_path / "fresh")
    assert sorted(p.name for p in fresh.glob("shard-*")) == [p.name for p in shards]
    for shard in shards:
        assert read_shard(shard) == read_shard(fresh / shard.name)
    assert len(LatentCache(out)) == CACHED + 2 and (out / "skipped.jsonl").read_text() == ""
    assert SkipLog(out / "skipped.jsonl").logged == {}


def test_an_edited_clip_or_caption_is_encoded_again_and_refused_until_then(folder, base, tmp_path: Path) -> None:
    """A caption rewritten and a clip replaced after the build: training served the old caption's embedding and the
    old clip's latents without a word (the fingerprint hashes the list of paths). Now training refuses the cache,
    naming how many samples changed, and building again encodes those two again: the cache then equals one built
    from scratch on the edited folder, byte for byte. Controls: an untouched cache is accepted, and a clip deleted
    after caching is not an edit (its latents are still served)."""
    import shutil

    clips_copy = tmp_path / "clips"
    shutil.copytree(folder, clips_copy)
    dataset, _ = build_dataset(data_config(clips_copy), seed=SEED)
    out = build(dataset, base, tmp_path / "latents")
    assert len(LatentCache(out, entries=dataset.entries)) == CACHED  # the control: nothing edited
    (clips_copy / "c1.txt").write_text("a caption written after the cache was built", encoding="utf-8")
    clips.write_clip(clips_copy / "c3.mp4", num_frames=12, size=(32, 24), seed=30)
    with pytest.raises(DataError, match=f"latent cache {out} is stale: 2 of its samples' files were edited .*c1.mp4"):
        LatentCache(out, entries=dataset.entries)
    build(dataset, base, out)
    fresh = build(dataset, base, tmp_path / "fresh")
    for shard in sorted(out.glob("shard-*.safetensors")):
        assert read_shard(shard) == read_shard(fresh / shard.name)
    assert "a caption written after" in read_shard(out / "shard-00000.safetensors")[0]
    (clips_copy / "c0.mp4").unlink()  # the clips may be deleted once they are cached
    assert len(LatentCache(out, entries=dataset.entries)) == CACHED
    shard = out / "shard-00001.safetensors"  # as an lvdm without stamps wrote it: refused, then mended by a build
    with safe_open(shard, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        rows = [{k: v for k, v in row.items() if k != "stamp"} for row in json.loads(handle.metadata()["samples"])]
    save_file(tensors, shard, metadata={"samples": json.dumps(rows)})
    with pytest.raises(DataError, match="built by an older lvdm, which did not note its files' stamps"):
        LatentCache(out, entries=dataset.entries)
    build(dataset, base, out)
    assert read_shard(shard) == read_shard(fresh / shard.name)


def test_training_refuses_a_cache_whose_captions_were_edited_in_one_line(tiny_assets, tmp_path: Path, command):
    """Through ``train.py``: one line naming the stale cache and the command that mends it, exit 1."""
    import shutil

    from conftest import tiny_overrides

    from lvdm.cache import build_from_config
    from lvdm.config import load_config

    data = shutil.copytree(tiny_assets["clips"], tmp_path / "clips")
    overrides = tiny_overrides(tiny_assets, tmp_path / "run", **{"data.cache": tmp_path / "cache", "data.root": data})
    build_from_config(load_config([], overrides), shard_size=4, progress=False)
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_text(caption.read_text(encoding="utf-8") + " at dusk", encoding="utf-8")
    (defaults := tmp_path / "defaults.yaml").write_text("{}\n")  # not the demo's config, which train.py takes alone
    result = command("train.py", "--config", defaults, *overrides)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "is stale: 1 of its samples' files were edited" in result.stderr and "python -m lvdm.cache" in result.stderr


def test_a_damaged_shard_is_named_by_the_build_and_by_training(cached, base, tmp_path: Path) -> None:
    """A truncated shard was "ready" to the build and a SafetensorError traceback to training; a FIFO in its place
    was "incomplete: run the build again" to training, and "ready" to the build, forever. Both now name the shard
    and say how to rebuild it; the control, the shard deleted as they say, rebuilds the same cache."""
    import shutil

    dataset, complete = cached
    out = shutil.copytree(complete, tmp_path / "latents")
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    for damage, message in (("truncated", "is damaged"), ("fifo", "is not a regular file")):
        if damage == "fifo":
            shard.unlink()
            os.mkfifo(shard)  # opened, it would hang both
        for attempt in (lambda: build(dataset, base, out), lambda: LatentCache(out)):
            with pytest.raises(DataError, match=f"shard {shard} {message}.*delete it and run python -m lvdm.cache"):
                attempt()
    shard.unlink()
    build(dataset, base, out)
    assert read_shard(shard) == read_shard(complete / shard.name) and len(LatentCache(out)) == CACHED


def read_shard(path: Path) -> tuple[str, dict[str, bytes]]:
    """A shard's metadata and the exact bytes of each tensor."""
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).numpy().tobytes() for key in handle.keys()}
        return handle.metadata()["samples"], tensors


# --- the command ----------------------------------------------------------------------------------------------------


@pytest.fixture
def run_cache(command):
    """``run_cache(*args)``: ``python -m lvdm.cache ARGS``, its ``main`` in this process (conftest's ``command``)."""
    return lambda *args: command("-m", "lvdm.cache", *args)


def test_the_cache_command_builds_what_training_accepts(tiny_assets, tmp_path: Path, run_cache) -> None:
    from lvdm.config import load_config
    from lvdm.models import load_base

    out = tmp_path / "latents"
    overrides = [
        f"model.base={tiny_assets['base']}", f"data.root={tiny_assets['clips']}", f"data.cache={out}",
        "data.num_frames=4", "data.resolution=[16,16]", "train.seed=5",
    ]  # fmt: skip
    result = run_cache(*overrides, "--shard-size", "4")
    assert result.returncode == 0, result.stderr
    assert f"latent cache ready: {out}" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "cache.json", "empty_text.safetensors", "shard-00000.safetensors", "shard-00001.safetensors",
    ]  # fmt: skip
    cfg = load_config([], overrides)
    loaded = load_base(cfg.model.base)  # what training's build_model hashes
    listing, _ = build_dataset(cfg.data, seed=cfg.train.seed)
    cache = LatentCache(out, expected=fingerprint(listing, loaded))
    assert len(cache) == 6 and json.loads((out / "cache.json").read_text())["shards"] == 2


def test_the_cache_command_reports_config_errors_with_exit_2(tmp_path: Path, run_cache) -> None:
    result = run_cache(f"model.base={tmp_path}", f"data.root={tmp_path}", "data.num_frame=4")
    assert result.returncode == 2 and "did you mean 'data.num_frames'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cache(f"model.base={tmp_path}", f"data.root={tmp_path}")
    assert result.returncode == 2 and "data.cache: set it" in result.stderr
    for size in ("0", "-1"):  # 0 was a traceback after loading; -1 "ready" with no shard written
        result = run_cache(f"model.base={tmp_path}", f"data.root={tmp_path}", f"data.cache={tmp_path / 'c'}",
                           "--shard-size", size)  # fmt: skip
        assert result.returncode == 2 and f"--shard-size {size}: must be a whole number in 1 .. " in result.stderr
        assert result.stderr.count("\n") == 1 and not (tmp_path / "c").exists(), result.stderr


def test_training_from_the_cache_keeps_the_holdout_out(tiny_assets, tmp_path):
    """With data.cache, the holdout entries are left out of training and used for the motion gain."""
    from conftest import tiny_overrides

    from lvdm.cache import build_from_config
    from lvdm.config import load_config
    from lvdm.data.build import holdout_indices
    from lvdm.training.trainer import Trainer

    overrides = tiny_overrides(tiny_assets, tmp_path / "run", **{"data.cache": tmp_path / "cache", "data.holdout": 2})
    cfg = load_config([], overrides)
    build_from_config(cfg, shard_size=4, progress=False)
    trainer = Trainer(cfg, progress=False)
    held = holdout_indices(6, 2)
    trained = {sample["index"] for sample in trainer.data.dataset.samples}
    validated = {int(i) for batch in trainer.data.validation for i in batch["index"]}
    assert trained and not trained & held and validated == held
    result = trainer.run()
    assert result.gain and result.gain["loss_in_order"] > 0 and "motion_gain" in result.gain
    assert "clips_frame_change" not in result.gain  # a latent cache holds no frames to measure


def test_a_resumed_build_does_not_write_through_a_link_as_its_skip_log(cached, base, tmp_path: Path) -> None:
    """An interrupted cache whose skipped.jsonl had become a link: the build appended to the file it named (a FIFO
    there hung it; lvdm.data.skip_log). Refused in one line; the control resumes once the link is gone."""
    import shutil

    dataset, complete = cached
    out = shutil.copytree(complete, tmp_path / "latents")
    (out / "shard-00002.safetensors").unlink()
    (out / "skipped.jsonl").unlink()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (out / "skipped.jsonl").symlink_to(notes)
    with pytest.raises(DataError, match="is not a regular file"):
        build(dataset, base, out)
    assert notes.read_text() == "mine"
    (out / "skipped.jsonl").unlink()
    build(dataset, base, out)  # the missing shard is rebuilt, logging its bad file (c6); c5, tried again, is too
    resumed, whole = ((folder / "skipped.jsonl").read_text().splitlines() for folder in (out, complete))
    assert resumed == whole


def test_the_command_says_how_many_samples_were_not_cached_and_fails_past_the_allowed_share(cached) -> None:
    """`python -m lvdm.cache` said only "latent cache ready" with a quarter of the clips skipped; it names the count
    and the log now, and ends in an error past data.max_bad_fraction (the cache is kept: it is complete)."""
    from lvdm.cache import BuiltCache, verdict

    dataset, out = cached
    built = BuiltCache(out, len(dataset), SkipLog(out / "skipped.jsonl").logged)
    with pytest.raises(DataError, match=r"^2 of 8 samples could not be cached .*: 25\.0% > data.max_bad_fraction 5"):
        verdict(built, 0.05)
    line = verdict(built, 0.25)
    assert line.startswith(f"latent cache ready: {out} (2 of 8 samples") and str(out / "skipped.jsonl") in line
    assert verdict(BuiltCache(out, 8, {}), 0.0) == f"latent cache ready: {out}"  # the control: nothing skipped


def test_a_skip_log_row_naming_a_unicode_line_separator_is_known_when_reopened(tmp_path: Path) -> None:
    """Rows are written as UTF-8 (U+2028 and U+0085 raw): read back with ``splitlines()`` such a path's row split
    in two and was lost, so a resumed build logged the file again and a mended file's row was never removed."""
    log_path = tmp_path / "skipped.jsonl"
    paths = [str(tmp_path / "a\u2028b.mp4"), str(tmp_path / "c\x85d.mp4"), str(tmp_path / "plain.mp4")]
    log = SkipLog(log_path)
    for path in paths:
        log.add(path, "too short")
    reopened = SkipLog(log_path)
    assert reopened.logged == dict.fromkeys(paths, "too short")
    assert not any(reopened.add(path, "too short") for path in paths)  # each once, also across a resume
    reopened.remove(paths[:2])
    assert SkipLog(log_path).logged == {paths[2]: "too short"}
