"""lvdm.config: YAML + key=value loading into the dataclass schema, every problem reported at once."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import pytest

from lvdm.config import (
    Config,
    DataConfig,
    ModelConfig,
    SourceConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    describe_config,
    load_config,
    option,
    save_config,
)
from lvdm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = ["model.base=bases/sd15", "data.root=clips"]


def problems_of(files: list[Any] = (), overrides: list[str] = (), **kwargs: Any) -> list[str]:
    """The problems one ``load_config`` call raises (it must raise)."""
    with pytest.raises(ConfigError) as info:
        load_config(files, overrides, **kwargs)
    assert str(info.value).count("\n") == len(info.value.problems), "one problem per line"
    return info.value.problems


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_files_merge_in_order_then_overrides(tmp_path: Path) -> None:
    base = write(
        tmp_path / "base.yaml",
        """
        model: {base: bases/sd15, base_config: bases/sd15-diffusers, loras: [a.safetensors:0.5]}
        data:
          root: clips
          resolution: [256, 256]
        train: {lr: 1e-4, max_steps: 100, mixed_precision: bf16}
        """,
    )
    run = write(tmp_path / "run.yaml", "train: {max_steps: 2000}\ndata: {num_frames: 8}\n")
    cfg = load_config(
        [base, str(run)], ["train.lr=3e-5", "data.resolution=[256,384]", "model.base_config=null", "data.flip=true"]
    )
    assert cfg.model == ModelConfig(base="bases/sd15", loras=["a.safetensors:0.5"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.mixed_precision) == (3e-5, 2000, "bf16")
    assert type(cfg.train.lr) is float and type(cfg.train.max_steps) is int
    assert (cfg.data.root, cfg.data.num_frames, cfg.data.resolution, cfg.data.flip) == ("clips", 8, [256, 384], True)
    assert cfg.train.batch_size == TrainConfig().batch_size and cfg.output_dir == "outputs/run"


def test_list_items_and_whole_sections_can_be_overridden(tmp_path: Path) -> None:
    run = write(
        tmp_path / "run.yaml",
        """
        model: {base: sd}
        data:
          sources:
            - {kind: folder, path: clips}
            - {kind: webvid, path: webvid.csv, video_root: videos, weight: 3}
        """,
    )
    cfg = load_config([run], ["data.sources[0].weight=2", "data.sources.1.path=other.csv", "train={lr: 0.001}"])
    assert cfg.data.sources == [
        SourceConfig(kind="folder", path="clips", weight=2.0),
        SourceConfig(kind="webvid", path="other.csv", video_root="videos", weight=3.0),
    ]
    assert cfg.train == TrainConfig(lr=0.001)


def test_a_mapping_value_is_replaced_whole_by_a_later_file_or_override(tmp_path: Path) -> None:
    """``train.tasks={interpolate: 1}`` over a config's ``{text: 1, predict: 2}`` trained all three tasks, and
    ``train.tasks={}`` changed nothing: a mapping-valued field merged key by key, as a section does."""
    run = write(
        tmp_path / "run.yaml",
        "model: {base: sd, context: true}\ndata: {root: clips}\ntrain: {tasks: {text: 1, predict: 2}}\n",
    )
    later = write(tmp_path / "later.yaml", "train: {tasks: {interpolate: 1}}\n")
    assert load_config([run], ["train.tasks={interpolate: 1}"]).train.tasks == {"interpolate": 1.0}
    assert load_config([run], ["train.tasks={}"]).train.tasks == {}
    assert load_config([run, later]).train.tasks == {"interpolate": 1.0}
    # the controls: one task's weight set by its key, and a section, still merge
    assert load_config([run], ["train.tasks.text=0"]).train.tasks == {"text": 0.0, "predict": 2.0}
    assert load_config([run], ["train={lr: 0.001}"]).train.tasks == {"text": 1.0, "predict": 2.0}


def test_yaml_scalars_are_yaml_1_2() -> None:
    """``no`` is a string (a valid mixed_precision), ``1e3`` a number, ``yes`` is not a boolean."""
    cfg = load_config([], [*MINIMAL, "train.mixed_precision=no", "train.max_steps=1e3", "train.lr=1"])
    assert (cfg.train.mixed_precision, cfg.train.max_steps, cfg.train.lr) == ("no", 1000, 1.0)
    assert problems_of([], [*MINIMAL, "data.flip=yes"]) == ["data.flip: expected bool, got 'yes' (str)"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trian.lr=1", "unknown key 'trian' (did you mean 'train'?)"),
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("model.attention_dept=2", "unknown key 'model.attention_dept' (did you mean 'model.attention_depth'?)"),
        (
            "data.sources=[{kind: folder, pth: x}]",
            "unknown key 'data.sources[0].pth' (did you mean 'data.sources[0].path'?)",
        ),
        ("train.zzzz=1", "unknown key 'train.zzzz'"),
    ],
)
def test_unknown_keys_at_any_depth_suggest_the_closest(override: str, expected: str) -> None:
    assert expected in problems_of([], [*MINIMAL, override])


def test_unknown_key_in_a_file_list(tmp_path: Path) -> None:
    run = write(
        tmp_path / "run.yaml", "model: {base: sd}\ndata:\n  sources:\n    - {kind: folder, path: a, wieght: 2}\n"
    )
    assert problems_of([run]) == ["unknown key 'data.sources[0].wieght' (did you mean 'data.sources[0].weight'?)"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=ten", "train.max_steps: expected int, got 'ten' (str)"),
        ("train.max_steps=10.5", "train.max_steps: expected int, got 10.5 (float)"),
        ("train.max_steps=true", "train.max_steps: expected int, got True (bool)"),
        ("train.lr=fast", "train.lr: expected float, got 'fast' (str)"),
        ("train.lr=false", "train.lr: expected float, got False (bool)"),
        ("data.flip=1", "data.flip: expected bool, got 1 (int)"),
        ("data.frame_stride=two", "data.frame_stride: expected int or list of int or null, got 'two' (str)"),
        ("data.resolution=[256, x]", "data.resolution[1]: expected int, got 'x' (str)"),
        ("data.buckets=[[256, 256], 384]", "data.buckets[1]: expected list of int, got 384 (int)"),
        ("model.loras=a.safetensors", "model.loras: expected list of str, got 'a.safetensors' (str)"),
        ("model.base=null", "model.base: expected str, got null"),
        ("train=5", "train: expected mapping (TrainConfig), got 5 (int)"),
        ("data.sources=[x]", "data.sources[0]: expected mapping (SourceConfig), got 'x' (str)"),
    ],
)
def test_wrong_types_name_the_key_the_type_and_the_value(override: str, expected: str) -> None:
    assert problems_of([], [*MINIMAL, override]) == [expected]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=0", "train.lr: must be > 0, got 0.0"),
        ("train.max_steps=0", "train.max_steps: must be >= 1, got 0"),
        ("train.caption_dropout=1.5", "train.caption_dropout: must be <= 1, got 1.5"),
        ("train.ema_decay=-0.1", "train.ema_decay: must be >= 0, got -0.1"),
        ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
        ("data.target_fps=0", "data.target_fps: must be > 0, got 0.0"),
        ("model.attention_heads=0", "model.attention_heads: must be >= 1, got 0"),
        ("data.resolution=[256, 260]", "data.resolution[1]: must be a multiple of 8, got 260"),
        ("data.buckets=[[256, 384], [0, 8]]", "data.buckets[1][0]: must be >= 8, got 0"),
        ("data.buckets=[[256, 384], [16384, 8]]", "data.buckets[1][0]: must be <= 8192, got 16384"),
        # each of these passed the check and then failed in a traceback (a loader overflow, a timeout's overflow,
        # a NaN validation video, a multinomial or a weighted choice of inf)
        ("train.batch_size=99999999999999999999", "train.batch_size: must be <= 4096, got 99999999999999999999"),
        ("model.spatial_lora_rank=100000000", "model.spatial_lora_rank: must be <= 1024, got 100000000"),
        ("data.decode_timeout=.inf", "data.decode_timeout: must be <= 86400, got inf"),
        ("train.validation_guidance=1e300", "train.validation_guidance: must be <= 100, got 1e+300"),
        # passed the check, then failed at the first validation, after training to it
        ("train.validation_steps=5000", "train.validation_steps: must be <= 1000, got 5000"),
        (
            "data.sources=[{kind: folder, path: a, weight: .inf}]",
            "data.sources[0].weight: must be <= 1000000.0, got inf",
        ),
        ("train.tasks={text: .inf}", "train.tasks: weights must be numbers in 0 .. 1e6 (relative), got {'text': inf}"),
        (
            'train.validation_prompts=["a \\ud800 b"]',
            "train.validation_prompts[0]: 'a \\ud800 b' is not valid Unicode text (a lone surrogate)",
        ),
    ],
)
def test_out_of_range_values_are_reported(override: str, expected: str) -> None:
    assert problems_of([], [*MINIMAL, override]) == [expected]


def test_a_number_too_long_to_read_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_text(f"train: {{lr: {'9' * 5000}}}\n")
    for files, overrides in (([tmp_path / "big.yaml"], MINIMAL), ([], [*MINIMAL, f"train.lr={'9' * 5000}"])):
        (problem,) = problems_of(files, overrides)
        assert "a value cannot be read (Exceeds the limit (4300 digits) for integer string conversion)" in problem
    assert load_config([], [*MINIMAL, f"model.mix_factor={'9' * 300}"]).model.mix_factor == float("9" * 300)  # read


def test_an_output_dir_inside_a_clip_folder_or_looping_is_refused(tmp_path: Path) -> None:
    """A run inside data.root had its own samples listed as clips when it resumed: the data order, and the
    weights, differed from an uninterrupted run. A link loop as output_dir was a RuntimeError traceback."""
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    base = "model.base=bases/sd15"
    for data, out in ((f"data.root={clips}", clips / "run"), (f"data.root={clips}", clips / "sub" / "run"),
                      (f"data.sources=[{{kind: folder, path: {clips}}}]", clips / "run")):  # fmt: skip
        assert problems_of([], [base, data, f"output_dir={out}"]) == [
            f"output_dir: '{out}' is inside the clip folder '{clips}', which is listed for clips at every start: "
            "the run's own samples would be read as clips when it resumes; put it outside"
        ]
    assert problems_of([], [base, f"data.root={clips}", f"output_dir={tmp_path / 'loop_a'}"]) == [
        f"output_dir: '{tmp_path / 'loop_a'}' is a link that loops; lvdm refuses to write a run there"
    ]
    manifest = f"data.manifest={clips / 'm.jsonl'}"  # a manifest names its files: nothing is listed
    for overrides in ([base, f"data.root={clips}", f"output_dir={tmp_path / 'run'}"], [base, manifest,
                      f"output_dir={clips / 'run'}"]):  # fmt: skip
        load_config([], overrides)  # the controls: beside the clips, or under a manifest's folder


def test_an_empty_path_or_a_base_config_for_a_folder_base_is_a_problem(tmp_path: Path) -> None:
    """``model.base: ""`` loaded the working folder; a base_config beside a folder base was silently ignored."""
    folder = tmp_path / "sd15"
    folder.mkdir()
    assert problems_of([], ['model.base=""', "data.root=clips", 'model.image_encoder=""']) == [
        "model.base: an empty path; give a file or folder, or null",
        "model.image_encoder: an empty path; give a file or folder, or null",
    ]
    assert problems_of([], [f"model.base={folder}", "data.root=clips", f"model.base_config={folder}"]) == [
        f"model.base_config: goes with a single-file base; {folder} is a diffusers folder, which gives its own "
        "architecture: leave base_config out"
    ]
    load_config([], [f"model.base={folder / 'b.safetensors'}", "data.root=clips", f"model.base_config={folder}"])


def test_an_option_of_another_target_is_a_problem_not_ignored() -> None:
    """``train.distill_from=16`` on a text-to-video run (and the like) was ignored without a word."""
    assert problems_of([], [*MINIMAL, "train.distill_from=16", "train.upscale_patch=8"]) == [
        "train.upscale_patch: the upscale target's option; train.target=denoise has no use for it: drop it",
        "train.distill_from: the distill target's option; train.target=denoise has no use for it: drop it",
    ]
    assert problems_of([], [*MINIMAL, "train.target=upscale", "train.decoder_layers=all"]) == [
        "train.decoder_layers: the decoder target's option; train.target=upscale has no use for it: drop it"
    ]
    load_config([], [*MINIMAL, "train.target=upscale", "train.upscale_patch=32"])  # the control: its own option
    load_config([], [*MINIMAL, "train.distill_from=64"])  # ... and another's at its default


@pytest.mark.parametrize(
    ("overrides", "read_with"),
    [
        (["model.spatial_lora_alpha=8"], ["model.spatial_lora_rank=2"]),
        (["model.layout=attention_only", "model.conv_kernel=[1,1,1]"], ["model.layout=videoldm"]),
        (["model.layout=conv_only", "model.attention_depth=2"], ["model.layout=videoldm"]),
        (["model.layout=conv_only", "model.attention_heads=2"], ["model.layout=animatediff"]),
        (["train.mixed_noise_lambda=0.2"], ["train.noise_prior=mixed"]),
        (["train.image_frame=random"], ["model.image_conditioning=true", "model.image_encoder=enc"]),
        (["train.image_dropout=0.5"], ["model.image_conditioning=true", "model.image_encoder=enc"]),
    ],
)
def test_an_option_the_rest_of_the_config_never_reads_is_a_problem_not_ignored(overrides, read_with) -> None:
    """``model.spatial_lora_alpha=8`` with no spatial LoRA, a conv kernel with no 3D convs, a shared-noise share with
    independent noise, image options with no image conditioning: each was accepted and ignored without a word."""
    (problem,) = problems_of([], [*MINIMAL, *overrides])
    key = overrides[-1].split("=")[0]
    assert problem.startswith(f"{key}: ") and problem.endswith(", so nothing reads it: drop it")
    load_config([], [*MINIMAL, *overrides, *read_with])  # the control: where it is read, it is taken


def test_literal_problems_list_the_allowed_values() -> None:
    assert problems_of([], [*MINIMAL, "model.layout=videldm", "train.mixed_precision=fp32"]) == [
        "model.layout: expected one of 'videoldm', 'attention_only', 'conv_only', 'animatediff', got 'videldm' (str)"
        " (did you mean 'videoldm'?)",
        "train.mixed_precision: expected one of 'no', 'fp16', 'bf16', got 'fp32' (str)",
    ]


def test_missing_required_fields_and_sections(tmp_path: Path) -> None:
    assert problems_of() == [
        "model.base: required, not set",
        "data: no data: set data.root, data.manifest or data.sources",
    ]
    assert problems_of([], ["model.base=???", "data.sources=[{path: a}]"]) == [
        "model.base: required, not set (still '???')",
        "data.sources[0].kind: required, not set",
    ]


def test_cross_field_rules() -> None:
    assert problems_of(
        [],
        [
            *MINIMAL,
            "data.frame_stride=2",
            "data.target_fps=8",
            "data.resolution=[256]",
            "model.conv_kernel=[3, 2, 1]",
            "model.loras=[a.safetensors:strong]",
            "data.sources=[{kind: webvid, path: w.csv}]",
        ],
    ) == [
        "model.conv_kernel: expected three odd sizes [frames, height, width], got [3, 2, 1]",
        "model.loras[0]: 'a.safetensors:strong': the scale after ':' must be a number, got 'strong'",
        "data.sources[0].video_root: required for kind 'webvid' (the folder holding the videos)",
        "data.frame_stride: set together with target_fps; choose a fixed stride or a frame rate",
        "data.resolution: expected [height, width], got [256]",
    ]


def test_every_problem_comes_in_one_error(tmp_path: Path) -> None:
    run = write(
        tmp_path / "run.yaml",
        """
        model: {layout: videldm}
        data: {root: clips, num_frames: 0, flip: yes}
        train: {lrr: 1e-4, max_steps: ten}
        ouput_dir: runs/a
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config([run], ["train.mixed_precision=fp32", "train.seed"])
    expected = [
        "override 'train.seed': expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4",
        "unknown key 'ouput_dir' (did you mean 'output_dir'?)",
        "model.base: required, not set",
        "model.layout: expected one of 'videoldm', 'attention_only', 'conv_only', 'animatediff', got 'videldm' (str)"
        " (did you mean 'videoldm'?)",
        "data.num_frames: must be >= 1, got 0",
        "data.flip: expected bool, got 'yes' (str)",
        "unknown key 'train.lrr' (did you mean 'train.lr'?)",
        "train.max_steps: expected int, got 'ten' (str)",
        "train.mixed_precision: expected one of 'no', 'fp16', 'bf16', got 'fp32' (str)",
    ]
    assert info.value.problems == expected
    assert str(info.value).splitlines() == ["invalid config (9 problems):", *(f"  {p}" for p in expected)]


def full_config() -> Config:
    return Config(
        model=ModelConfig(base="bases/sd15.safetensors", base_config="bases/sd15", loras=["l.safetensors:0.7"]),
        data=DataConfig(
            sources=[
                SourceConfig("folder", "clips"),
                SourceConfig("webvid", "w.csv", video_root="videos", weight=0.5),
            ],
            resolution=[320, 512],
            buckets=[[256, 448], [320, 512]],
            target_fps=7.5,
        ),
        train=TrainConfig(
            lr=1e-10,
            ema_decay=0.9999,
            snr_gamma=5.0,
            mixed_precision="no",
            validation_prompts=["no", "1e-4", "yes", "a: b", "${x} and \\${y}", "null", "~", "", "100%"],
        ),
        output_dir="runs/${name}",
    )


def test_save_then_load_is_equal(tmp_path: Path) -> None:
    cfg = full_config()
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config([path]) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert load_config([save_config(load_config([], MINIMAL), tmp_path / "minimal.yaml")]) == load_config([], MINIMAL)


def test_a_prompt_holding_a_next_line_character_is_saved_and_read_back_as_it_was(tmp_path: Path) -> None:
    """A validation prompt holding NEL (U+0085) was written single-quoted, where PyYAML folds it as a line break: the
    saved config read it back as a space. The controls: U+2028 and a newline, which it wrote readably already."""
    prompts = ["\x85nel", "a\u2028b", "two\nlines"]
    full = full_config()
    cfg = dataclasses.replace(full, train=dataclasses.replace(full.train, validation_prompts=prompts))
    assert load_config([save_config(cfg, tmp_path / "config.yaml")]).train.validation_prompts == prompts


def test_config_to_dict_is_plain_data() -> None:
    data = config_to_dict(full_config())
    assert data["data"]["sources"][1] == {"kind": "webvid", "path": "w.csv", "video_root": "videos", "weight": 0.5}
    assert list(data) == ["model", "data", "train", "output_dir"]
    with pytest.raises(TypeError):
        config_to_dict(Config)


def test_key_references_are_resolved_before_saving(tmp_path: Path) -> None:
    run = write(
        tmp_path / "run.yaml", "train:\n  checkpoint_every: 250\n  validate_every: ${train.checkpoint_every}\n"
    )
    cfg = load_config([run], [*MINIMAL, "output_dir=runs/${train.log_every}"])
    assert (cfg.train.validate_every, cfg.output_dir) == (250, "runs/10")
    saved = save_config(cfg, tmp_path / "saved.yaml").read_text()
    assert "validate_every: 250" in saved and "${" not in saved


@pytest.mark.parametrize(
    "value",
    ["${oc.env:HOME}", "${oc.env:HOME}/runs", "x/${ oc.env : HOME }", '${oc.decode:"1"}', "\\\\${oc.env:HOME}"],
)
def test_environment_resolvers_are_refused(tmp_path: Path, value: str) -> None:
    run = write(tmp_path / "run.yaml", f"output_dir: '{value}'\n")
    problems = problems_of([run], MINIMAL)
    assert len(problems) == 1 and problems[0].startswith("output_dir: ") and "resolvers such as" in problems[0]
    assert os.environ.get("HOME", "/nowhere") not in "\n".join(problems)
    assert "resolvers such as" in problems_of([], [*MINIMAL, f"output_dir='{value}'"])[0]


def test_nested_resolver_names_are_refused(tmp_path: Path) -> None:
    run = write(tmp_path / "run.yaml", "output_dir: ${${train.resume}:HOME}\ntrain: {resume: oc.env}\n")
    assert "resolvers such as" in problems_of([run], MINIMAL)[0]


def test_escaped_interpolations_stay_literal(tmp_path: Path) -> None:
    run = write(tmp_path / "run.yaml", "output_dir: runs/\\${oc.env:HOME}\n")
    cfg = load_config([run], MINIMAL)
    assert cfg.output_dir == "runs/${oc.env:HOME}"
    assert load_config([save_config(cfg, tmp_path / "saved.yaml")]) == cfg


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", "train lr=1", "data.resolution=[256"])
def test_malformed_overrides_are_named(override: str) -> None:
    problems = problems_of([], [*MINIMAL, override])
    assert len(problems) == 1 and problems[0].startswith(f"override {override!r}: ")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "data.sources[3].path=x",
            "cannot set data.sources[3].path: data.sources is [] (list), which has no item '3'",
        ),
        ("train.lr.x=1", "cannot set train.lr.x: train.lr is 0.0001 (float), which has no item 'x'"),
    ],
)
def test_unsettable_override_is_named(override: str, expected: str) -> None:
    assert problems_of([], [*MINIMAL, override]) == [f"override {override!r}: {expected}"]


def test_unresolvable_reference_is_named() -> None:
    problems = problems_of([], [*MINIMAL, "output_dir=${train.nope}"])
    assert len(problems) == 1 and problems[0].startswith("output_dir: cannot resolve: ")


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "model:\n  base: [unclosed\n")
    twice = write(tmp_path / "twice.yaml", "train: {lr: 1}\ntrain: {lr: 2}\n")
    unsafe = write(tmp_path / "unsafe.yaml", "model: !!python/object/apply:os.system ['echo pwned']\n")
    scalar = write(tmp_path / "scalar.yaml", "just a string\n")
    missing = tmp_path / "missing.yaml"
    problems = problems_of([missing, bad, twice, unsafe, scalar], ["train.lr"])
    assert [p.split(": ")[0] for p in problems] == [
        f"config file {str(path)!r}" for path in (missing, bad, twice, unsafe, scalar)
    ] + ["override 'train.lr'"]
    assert problems[0].endswith("not found") and "not valid YAML: line 3" in problems[1]
    assert "'train' given twice" in problems[2] and "python/object" in problems[3]
    assert "expected a mapping" in problems[4]


def test_a_yaml_type_the_config_cannot_hold_is_named_where_it_is_written(tmp_path: Path) -> None:
    """A !!set or !!timestamp failed the merge, which dropped the whole file and named model.base and data as
    missing although the command line gave them."""
    for text, tag in (("train: !!set {a, b}\n", "!!set"), ("train: {lr: !!timestamp 2001-12-14}\n", "!!timestamp")):
        path = write(tmp_path / "typed.yaml", text)
        assert problems_of([path], MINIMAL) == [
            f"config file {str(path)!r}: not valid YAML: line 1, column {text.index('!!') + 1}: {tag} is not a config "
            "value (use a list, a string or a number)"
        ]
    path = write(tmp_path / "plain.yaml", "train: {lr: 2001-12-14}\n")  # the control: an unmarked date is a string
    assert problems_of([path], MINIMAL) == ["train.lr: expected float, got '2001-12-14' (str)"]


def test_resolution_int_means_square() -> None:
    assert load_config([], [*MINIMAL, "data.resolution=320"]).data.resolution == [320, 320]
    assert config_from_dict({"model": {"base": "sd"}, "data": {"root": "c", "resolution": 64}}).data.resolution == [
        64,
        64,
    ]


def test_a_leading_tilde_in_a_path_is_the_home_folder(tmp_path: Path) -> None:
    """``output_dir: ~/runs/a`` in a YAML file was a folder named ``~`` in the working folder, while the check
    refusing the home folder read ``~`` as home. The control: a ``~`` inside a name stays as written."""
    home = Path.home()
    config = write(tmp_path / "c.yaml", """
        model: {base: ~/bases/sd15, loras: ["~/l.safetensors:0.5"]}
        data: {sources: [{kind: folder, path: ~/clips}]}
        output_dir: ~/runs/a
        """)  # fmt: skip
    cfg = load_config([config], ["train.resume=~/runs/a/checkpoints/checkpoint-00000002", "data.cache=a~b"])
    assert cfg.output_dir == str(home / "runs" / "a") and cfg.model.base == str(home / "bases" / "sd15")
    assert cfg.model.loras == [f"{home / 'l.safetensors'}:0.5"] and cfg.data.sources[0].path == str(home / "clips")
    assert cfg.train.resume == str(home / "runs/a/checkpoints/checkpoint-00000002") and cfg.data.cache == "a~b"
    assert any("your home folder" in p for p in problems_of([], [*MINIMAL, "output_dir=~/"]))


def test_an_environment_variable_in_a_path_is_refused_not_taken_as_a_folder_name(tmp_path: Path) -> None:
    """``output_dir: $SCRATCH/runs/a`` in a YAML file (which no YAML reader expands) trained into a folder named
    ``$SCRATCH`` in the working folder. The controls: a ``$`` inside a name, and in a prompt, stay as written."""
    config = write(tmp_path / "c.yaml", """
        model: {base: $MODELS/sd15, loras: [a.safetensors, "$HOME/l.safetensors:0.5"]}
        data: {sources: [{kind: folder, path: runs/$USER/clips}]}
        output_dir: $SCRATCH/runs/a
        """)  # fmt: skip
    problems = problems_of([config])
    keys = ["model.base", "model.loras[1]", "data.sources[0].path", "output_dir"]
    assert [p.split(":")[0] for p in problems] == keys
    assert "'$SCRATCH/runs/a' holds $SCRATCH, which lvdm does not expand" in problems[-1]
    cfg = load_config([], [*MINIMAL, "output_dir=runs/a$b", "train.validation_prompts=[$5 bills]"])
    assert (cfg.output_dir, cfg.train.validation_prompts) == ("runs/a$b", ["$5 bills"])


def test_source_weights_must_not_all_be_zero() -> None:
    problems = problems_of([], ["model.base=sd", "data.sources=[{kind: folder, path: a, weight: 0}]"])
    assert problems == ["data.sources: every weight is 0; at least one source needs a positive weight"]


# A schema exercising the generic machinery beyond what Config uses today.
@dataclass
class Part:
    name: str = option(help="a name")
    size: tuple[int, int] = option((1, 2), "a fixed pair")


@dataclass
class Toy:
    mode: Literal["a", "b"] = option("a", "a mode")
    parts: list[Part] = option([], "parts")
    extra: dict[str, Any] = option({}, "free-form settings")
    pair: tuple[int, int] | None = option(None, "an optional pair", min=0)
    level: int = option(1, "a level", choices=(1, 2, 4))
    ratio: float = option(0.5, "a ratio")


def test_generic_types() -> None:
    toy = load_config(
        [], ["parts=[{name: x, size: [3, 4]}]", "extra={k: [1, {v: null}]}", "pair=[5, 6]", "ratio=2"], schema=Toy
    )
    assert toy == Toy(parts=[Part("x", (3, 4))], extra={"k": [1, {"v": None}]}, pair=(5, 6), ratio=2.0)
    assert type(toy.ratio) is float and config_from_dict(config_to_dict(toy), Toy) == toy
    assert problems_of(
        [], ["parts=[{size: [1, 2, 3]}]", "extra=[1]", "pair=[-1, 2]", "level=3", "mode=c"], schema=Toy
    ) == [
        "mode: expected one of 'a', 'b', got 'c' (str)",
        "parts[0].name: required, not set",
        "parts[0].size: expected [int, int], got [1, 2, 3] (list)",
        "extra: expected mapping of str to any value, got [1] (list)",
        "pair[0]: must be >= 0, got -1",
        "level: expected one of 1, 2, 4, got 3 (int)",
    ]


def test_option_requires_help_and_copies_mutable_defaults() -> None:
    with pytest.raises(TypeError, match="help"):
        option(1)
    assert DataConfig().sources is not DataConfig().sources
    assert Config(model=ModelConfig("a"), data=DataConfig()).train is not Config(ModelConfig("a"), DataConfig()).train


def test_describe_config_lists_every_key_with_type_default_and_help() -> None:
    text = describe_config()
    lines = text.splitlines()
    assert "model.base: str (required)" in lines
    assert "train.lr: float = 0.0001 (<= 10, > 0)" in lines
    assert "train.caption_dropout: float = 0.1 (>= 0, <= 1)" in lines
    assert "model.layout: one of 'videoldm', 'attention_only', 'conv_only', 'animatediff' = videoldm" in lines
    assert "data.sources[i].kind: one of 'folder', 'webvid', 'manifest', 'images' (required)" in lines
    assert "data.resolution: list of int = [256, 256] (>= 8, <= 8192, a multiple of 8)" in lines
    for cls in (Config, ModelConfig, DataConfig, SourceConfig, TrainConfig):
        for spec in fields(cls):
            assert spec.metadata.get("help"), f"{cls.__name__}.{spec.name} has no help"
            assert spec.metadata["help"] in text
    for key in ("model.attention_backend", "data.sources[i].weight", "train.validation_prompts", "output_dir"):
        assert any(line.startswith(f"{key}: ") for line in lines)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)


def test_checking_a_config_imports_nothing_heavy() -> None:
    """Config errors come before torch loads: ``import lvdm.config`` and a full check pull in no torch or diffusers."""
    code = """
import sys
from lvdm.config import describe_config, load_config
from lvdm.errors import ConfigError
describe_config()
load_config([], ["model.base=sd", "data.root=clips"])
try:
    load_config([], ["train.lrr=1"])
except ConfigError:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "accelerate"))
assert not heavy, heavy
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_the_sampling_commands_help_loads_no_diffusers() -> None:
    """``--help`` (and argparse's own refusals) come before diffusers and torch load: it took 5.6 s, when the
    parser's imports pulled in the pipeline (and ``lvdm.models`` imported every model at once), then 2-3 s while
    they pulled in torch; about 0.6 s now. Both commands in one interpreter, then the control: the video UNet does
    import diffusers and torch."""
    code = """
import runpy, sys
for command in ("sample.py", "lvdm/upscale.py"):
    sys.argv = [command, "--help"]
    try:
        runpy.run_path(command, run_name="__main__")
    except SystemExit as stop:
        assert stop.code == 0, (command, stop.code)
    import lvdm.models
    assert {"VideoUNet", "load_base", "TemporalLayout"} <= set(dir(lvdm.models))  # listed before first use
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "peft", "torch"))
    assert not heavy, (command, heavy[:5])
from lvdm.models import VideoUNet
assert "diffusers" in sys.modules and "torch" in sys.modules
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "text, reason",
    [
        (
            "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
            + "".join(f"b{i}: &b{i} [{', '.join(['*b' + str(i - 1) if i else '*a'] * 10)}]\n" for i in range(7)),
            "alias bomb",
        ),  # fmt: skip
        ("model: " + "[" * 20000 + "]" * 20000 + "\n", "nested more than 64 levels"),
        ("model: &m {base: *m}\n", "refers to itself"),
    ],
    ids=["alias_bomb", "deep", "self_reference"],
)
def test_hostile_yaml_is_refused_quickly_with_a_message(tmp_path, text, reason):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=reason):
        load_config([path])
    assert time.perf_counter() - started < 10


def test_hostile_override_values_are_refused_like_files():
    for value, reason in (("[" * 20000 + "]" * 20000, "nested more than 64 levels"), ("&m [*m]", "refers to itself")):
        with pytest.raises(ConfigError, match=reason) as caught:
            load_config([], [f"model.base={value}"])
        assert len(str(caught.value)) < 1000  # the override is cut in the message


def test_out_of_range_seeds_and_steps_are_refused_by_the_config_check():
    base = ["model.base=b", "data.root=d"]
    for override, key in (("train.seed=-1", "train.seed"), ("train.seed=4294967296", "train.seed"),
                          ("train.max_steps=100000000", "train.max_steps")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            load_config([], [*base, override])
    assert load_config([], [*base, "train.seed=4294967295", "train.max_steps=99999999"]).train.seed == 2**32 - 1


def test_a_flood_of_problems_lists_the_first_forty(tmp_path: Path) -> None:
    """A 2000-link interpolation chain printed 1941 lines of RecursionError, one per key."""
    chain = "\n".join(f"  k{i}: ${{x.k{i + 1}}}" for i in range(300))
    path = write(tmp_path / "chain.yaml", f"x:\n{chain}\n  k300: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config([path], MINIMAL)
    lines = str(info.value).splitlines()
    assert len(info.value.problems) > 40 and len(lines) == 42, lines[:3]
    assert lines[-1] == f"  ... and {len(info.value.problems) - 40} more"


def test_predict_frames_is_checked_only_when_the_predict_task_is_on():
    """``data.num_frames=2`` on a text-to-video run was refused over ``train.predict_frames`` (its default [0, 1, 2]),
    an option of a task the run does not train."""
    for files in ([], [Path(__file__).resolve().parents[1] / "configs" / "t2v_sd15.yaml"]):
        for frames in (1, 2):
            assert load_config(files, [*MINIMAL, f"data.num_frames={frames}"]).data.num_frames == frames
    predict = [*MINIMAL, "data.num_frames=2", "model.context=true", "train.tasks={text: 1, predict: 1}"]
    with pytest.raises(ConfigError, match=r"train.predict_frames: each must be 0 \.\. 1 .*got \[0, 1, 2\]"):
        load_config([], predict)  # the control: with the predict task on, the same value is still refused
    assert load_config([], [*predict, "train.predict_frames=[0,1]"]).train.predict_frames == [0, 1]


def test_an_output_dir_in_the_kernels_proc_or_sys_is_refused_saying_so(tmp_path):
    """``output_dir=/proc/self`` passed the config check, then said "not writable: No such file or directory"."""
    for folder in ("/proc/self", "/proc/1/task", "/sys/kernel"):
        with pytest.raises(ConfigError, match=f"output_dir: '{folder}' is inside /(proc|sys), the kernel's own"):
            load_config([], [*MINIMAL, f"output_dir={folder}"])
    for folder in (tmp_path / "proc", tmp_path / "sys" / "run"):  # the control: folders of those names elsewhere
        assert load_config([], [*MINIMAL, f"output_dir={folder}"]).output_dir == str(folder)


def test_a_one_frame_text_to_video_run_trains_and_validates_to_the_end(tmp_path, tiny_assets):
    """Once ``data.num_frames=1`` passed the config check, the run trained every step and then failed in its final
    validation ("frame metrics need at least 2 frames"): one frame has no figures between frames."""
    from conftest import tiny_overrides

    from lvdm.training.trainer import train

    extra = {"data.num_frames": 1, "train.max_steps": 2, "train.validation_prompts": "[a cat]"}
    result = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra)), progress=False)
    assert result.temporal_path.is_file() and (tmp_path / "run" / "samples" / "step-00000002" / "00.gif").is_file()
    assert not any("frame_change" in line for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines())


def test_nan_is_answered_with_what_the_field_takes():
    """NaN where a number goes names the numbers allowed (it read "expected float or null, got nan (float)"); where
    a list or a mapping of numbers goes, it names that (it asked for "a number in 1 .. 100", and 5 was then
    refused as not a list); NaN in a list of numbers is named with the list (it read "expected float or list of
    float or null, got [1, nan] (list)")."""
    with pytest.raises(ConfigError) as refused:
        load_config(
            [], ["train.lr=.nan", "train.distill_guidance=.nan", "train.tasks=.nan", "data.target_fps=[1,.nan]"]
        )
    problems = str(refused.value)
    assert "data.target_fps: must be a number > 0, got nan in [1, nan]" in problems, problems
    assert "train.lr: must be a number > 0 and <= 10, got nan" in problems, problems
    assert "train.distill_guidance: expected list of float, got nan (float)" in problems, problems
    assert "train.tasks: expected mapping of str to float, got nan (float)" in problems, problems
