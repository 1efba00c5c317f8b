"""Loading bases (diffusers folder, single file, pickles), LoRAs, and moving a temporal module between bases."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import frame_by_frame, randomize, video_inputs
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from lvdm import testing
from lvdm.errors import CheckpointError, ConfigError
from lvdm.models import LoraSpec, VideoUNet, load_base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Base A (folder, seed 0), base B (single-file SD1 checkpoint, seed 1), a kohya and a peft LoRA for B."""
    root = tmp_path_factory.mktemp("files")
    folder_a = testing.make_tiny_sd(root / "base_a", "sd1", seed=0)
    components_b = testing.tiny_sd_components("sd1", seed=1)
    single_b = testing.write_single_file_checkpoint(components_b, root / "dreambooth_b.safetensors")
    kohya = testing.write_lora(components_b["unet"], root / "style_kohya.safetensors", format="kohya", seed=3)
    peft = testing.write_lora(components_b["unet"], root / "style_peft.safetensors", format="peft", seed=4)
    return {"a": folder_a, "b": single_b, "kohya": kohya, "peft": peft, "root": root}


def _reference_pipe(files, loras):
    """diffusers' own StableDiffusionPipeline with B and the LoRAs loaded as adapters (not fused)."""
    pipe = StableDiffusionPipeline.from_single_file(
        str(files["b"]), config=str(files["a"]), local_files_only=True, safety_checker=None
    )
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"ref{i}")
        names.append(f"ref{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    return pipe


def test_diffusers_folder_loads_every_component(files):
    base = load_base(files["a"])
    reference = testing.tiny_sd_components("sd1", seed=0)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(base, name).state_dict(), reference[name].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert base.family.startswith("custom-") and base.prediction_type == "epsilon"


def test_a_folder_saved_in_fp16_loads_in_float32_unless_a_dtype_is_given(tmp_path):
    """A folder whose weights are fp16 (SD's "fp16" folders) loaded its UNet and VAE in float32 but its text
    encoder in fp16 (transformers keeps the files' dtype), while the sidecar recorded fp32. The control: a dtype
    given is the dtype of every part."""
    pipe = StableDiffusionPipeline(
        **testing.tiny_sd_components("sd1", seed=0), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(torch.float16).save_pretrained(tmp_path, safe_serialization=True)
    for dtype, expected in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        base = load_base(tmp_path, dtype=dtype)
        parts = {name: next(getattr(base, name).parameters()).dtype for name in ("unet", "vae", "text_encoder")}
        assert parts == dict.fromkeys(parts, expected), (dtype, parts)


def test_sd2_folder_is_v_prediction(sd_folders):
    assert load_base(sd_folders["sd2"]).prediction_type == "v_prediction"


def test_module_trained_on_a_runs_on_single_file_b_with_kohya_lora(files, tmp_path):
    # train on A (here: random temporal weights stand in for training) and save the module
    video_a = VideoUNet.from_unet2d(load_base(files["a"]).unet).freeze_base()
    randomize(video_a.temporal_parameters())
    module = tmp_path / "motion.safetensors"
    video_a.save_temporal(module)

    base_b = load_base(files["b"], base_config=files["a"], loras=[f"{files['kohya']}:0.7"])
    video_b = VideoUNet.from_temporal_file(base_b.unet, module)
    for name, tensor in video_a.temporal_state_dict().items():
        assert torch.equal(dict(video_b.named_temporal_parameters())[name], tensor)

    reference = _reference_pipe(files, [(files["kohya"], 0.7)]).unet
    sample, timestep, text = video_inputs(reference)
    with torch.no_grad():
        expected = frame_by_frame(reference, sample, timestep, text)
        image_mode = video_b(sample, timestep, text, image_only_indicator=torch.ones(2))
        without_lora = frame_by_frame(_reference_pipe(files, []).unet, sample, timestep, text)
    assert (image_mode - expected).abs().max() < 1e-5  # B + LoRA, as diffusers computes it
    assert (without_lora - expected).abs().max() > 1e-3  # and the LoRA did change B


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # diffusers' reference, not lvdm's
def test_several_loras_each_with_its_scale(files):
    loras = [(files["kohya"], 0.5), (files["peft"], 1.5)]
    base = load_base(files["b"], base_config=files["a"], loras=loras)
    reference = _reference_pipe(files, loras).unet
    sample, timestep, text = video_inputs(reference, b=1, f=2)
    video = VideoUNet.from_unet2d(base.unet)
    with torch.no_grad():
        expected = frame_by_frame(reference, sample, timestep, text)
        assert (video(sample, timestep, text) - expected).abs().max() < 1e-5


def test_a_tuple_of_lora_specs_is_several_loras(files):
    """``loras=(LoraSpec(a, 0.5), LoraSpec(b, 1.5))`` was taken for one ``(path, scale)`` pair and refused ("expected a
    path, 'PATH:SCALE' or a (path, scale) pair"). The control: the same LoRAs in a list, and one pair alone."""
    from lvdm.pipeline_loading import load_parts

    listed = [LoraSpec(files["kohya"], 0.5), LoraSpec(files["peft"], 1.5)]
    wanted = load_parts(files["b"], base_config=files["a"], loras=listed)
    mixed = load_parts(files["b"], base_config=files["a"], loras=(files["kohya"], LoraSpec(files["peft"], 1.5)))
    assert mixed.sources["loras"][1:] == wanted.sources["loras"][1:]
    parts = load_parts(files["b"], base_config=files["a"], loras=tuple(listed))
    assert parts.sources["loras"] == wanted.sources["loras"]
    for ours, theirs in zip(parts.base.unet.parameters(), wanted.base.unet.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    pair = load_parts(files["b"], base_config=files["a"], loras=(files["kohya"], 0.5))
    assert pair.sources["loras"] == wanted.sources["loras"][:1]


def test_spatial_weights_given_as_the_base_or_the_module_are_named_as_spatial_weights(files, tmp_path):
    """A run's spatial_weights.safetensors given as the base was refused with "give it as the temporal module
    (--temporal)", and given there with "load base checkpoints and LoRAs with load_base": each sent the user to the
    other. Both now name --spatial-weights. The control: given there, it loads."""
    from lvdm.errors import TemporalModuleError
    from lvdm.training.groups import export_spatial_weights

    base = load_base(files["a"])
    weight = base.unet.conv_in.weight
    path = export_spatial_weights({"conv_in.weight": torch.nn.Parameter(weight + 1)}, tmp_path / "spatial.safetensors")
    with pytest.raises(CheckpointError, match=r"give it as the spatial weights \(--spatial-weights"):
        load_base(path)
    with pytest.raises(TemporalModuleError, match=r"holds spatial UNet weights .* give it as the spatial weights"):
        VideoUNet.from_temporal_file(base.unet, path)
    assert torch.equal(load_base(files["a"], spatial_weights=path).unet.conv_in.weight, weight + 1)


def test_a_mapping_of_loras_keeps_its_scales_and_load_base_takes_one_lora_alone(files):
    """``loras={path: 0.5}`` was iterated for its keys: the LoRA fused at 1.0, its scale dropped without a word; and
    ``load_base(loras="x.safetensors")`` read the path a character at a time. The controls: the same LoRA as a
    ``(path, scale)`` pair, and a set (whose order is not stable) refused."""
    from lvdm.pipeline_loading import load_parts

    wanted = load_parts(files["b"], base_config=files["a"], loras=[(files["kohya"], 0.5)])
    mapped = load_parts(files["b"], base_config=files["a"], loras={files["kohya"]: 0.5})
    assert mapped.sources["loras"] == wanted.sources["loras"] and wanted.sources["loras"][0].endswith(":0.5")
    for ours, theirs in zip(mapped.base.unet.parameters(), wanted.base.unet.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    alone = load_base(files["b"], base_config=files["a"], loras=files["kohya"])
    assert alone.loras == [LoraSpec(Path(files["kohya"]), 1.0)]
    with pytest.raises(ConfigError, match="expected a list of LoRAs"):
        load_base(files["b"], base_config=files["a"], loras={files["kohya"]})


def test_pickle_checkpoint_needs_allow_pickle(files, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(files["b"])}, ckpt)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_base(ckpt, base_config=files["a"])
    base = load_base(ckpt, base_config=files["a"], allow_pickle=True)
    expected = load_base(files["b"], base_config=files["a"]).unet.state_dict()
    assert all(torch.equal(base.unet.state_dict()[k], v) for k, v in expected.items())


def test_pickle_lora_needs_allow_pickle(files, tmp_path):
    lora = tmp_path / "style.pt"
    torch.save(load_file(files["kohya"]), lora)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_base(files["b"], base_config=files["a"], loras=[lora])


def test_folder_with_only_pickled_weights_is_refused(files, tmp_path):
    folder = testing.make_tiny_sd(tmp_path / "bin_base", "sd1", seed=0)
    unet = testing.tiny_unet("sd1", seed=0)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_base(folder)
    assert load_base(folder, allow_pickle=True).unet is not None


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.99])
def test_truncated_checkpoint_is_a_clear_error(files, tmp_path, fraction):
    data = files["b"].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="not a readable safetensors") as info:
        load_base(broken, base_config=files["a"])
    assert str(broken) in str(info.value)


def test_text_renamed_safetensors_is_a_clear_error(files, tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_text("<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="fake.safetensors"):
        load_base(fake, base_config=files["a"])


def test_nan_lora_is_refused_by_tensor_name(files, tmp_path):
    tensors = load_file(files["kohya"])
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key][0, 0] = float("nan")
    bad = tmp_path / "nan_lora.safetensors"
    save_file(tensors, bad)
    with pytest.raises(CheckpointError, match="NaN") as info:
        load_base(files["b"], base_config=files["a"], loras=[bad])
    assert key in str(info.value)


def test_lora_for_another_architecture_is_a_clear_error(files, tmp_path):
    sd2_unet = testing.tiny_unet("sd2", seed=0)
    foreign = testing.write_lora(sd2_unet, tmp_path / "sd2_lora.safetensors", format="peft")
    with pytest.raises(CheckpointError, match="sd2_lora.safetensors"):
        load_base(files["b"], base_config=files["a"], loras=[foreign])


def test_missing_paths_are_clear_errors(files, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_base(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_base(files["a"], loras=[tmp_path / "missing_lora.safetensors"])
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        load_base(files["b"], base_config=tmp_path)
    with pytest.raises(CheckpointError, match="/dev/zero is not a regular file"):  # it said "does not exist"
        load_base(files["a"], loras=["/dev/zero"])


def test_lora_spec_parsing(tmp_path):
    assert LoraSpec.parse("a/b.safetensors:0.7") == LoraSpec(tmp_path.__class__("a/b.safetensors"), 0.7)
    assert LoraSpec.parse("a/b.safetensors").scale == 1.0
    assert LoraSpec.parse(("x.safetensors", 2)).scale == 2.0
    with pytest.raises(ConfigError, match="scale"):  # a bad value (exit 2), not a bad file
        LoraSpec.parse("a/b.safetensors:strong")
    with pytest.raises(ConfigError, match="must be a number, got '0_5'"):  # float() reads it as 5
        LoraSpec.parse("a/b.safetensors:0_5")
    with pytest.raises(ConfigError, match="does not exist"):  # not "the scale after ':' must be a number"
        LoraSpec.parse("C:\\nope.safetensors")
    # the command-line form a sidecar records: the scale exact (0.123457 re-rendered other frames), short if it can be
    assert LoraSpec.parse("a.safetensors:0.123456789").text() == "a.safetensors:0.123456789"
    assert [LoraSpec.parse(f"a.safetensors{tail}").text("b") for tail in ("", ":0.7")] == ["b:1", "b:0.7"]


def test_a_lora_that_applies_no_layer_or_is_a_dora_is_one_line(files, tmp_path):
    """A LoRA whose every layer diffusers dropped (an SDXL second text encoder's, an empty file) was a ValueError
    traceback from set_adapters; a DoRA's magnitudes diffusers drops, and it applied the rest as a plain LoRA (other
    frames, without a word on the command line)."""
    tensors = load_file(files["kohya"])
    save_file(
        {key.replace("lora_unet_", "lora_te2_"): value for key, value in tensors.items()}, tmp_path / "te2.safetensors"
    )
    save_file({}, tmp_path / "empty.safetensors")
    doras = {key.replace(".lora_down.weight", ".dora_scale"): torch.ones(1, value.shape[1])
             for key, value in tensors.items() if key.endswith(".lora_down.weight")}  # fmt: skip
    save_file(tensors | doras, tmp_path / "dora.safetensors")
    torch.save(tensors | doras, tmp_path / "dora.pt")  # a pickled one was applied as a plain LoRA
    for name, message in (("te2.safetensors", r"none of its \d+ layers matches a layer of this base"),
                          ("empty.safetensors", "holds no LoRA layers"), ("dora.safetensors", "is a DoRA"),
                          ("dora.pt", "is a DoRA")):  # fmt: skip
        with pytest.raises(CheckpointError, match=message):
            load_base(files["b"], base_config=files["a"], loras=[str(tmp_path / name)], allow_pickle=True)
    load_base(files["b"], base_config=files["a"], loras=[str(files["kohya"])])  # the control: the LoRA as written


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_a_lora_with_layers_the_base_lacks_warns_how_many_were_ignored(files, tmp_path, kind):
    """diffusers dropped such layers without a word on the command line (its warning is below lvdm's log level
    there): a LoRA for another base applied in part, silently. The control: the LoRA as written warns nothing."""
    import warnings

    tensors = load_file(files[kind])
    first = sorted(
        key for key in tensors if "down_blocks" in key and key.endswith(("lora_down.weight", "lora_A.weight"))
    )[0]
    stem = first.rsplit(".", 2)[0]  # the layer's prefix, in the file's own naming
    moved = {key.replace("down_blocks_0", "down_blocks_9").replace("down_blocks.0", "down_blocks.9"): value.clone()
             for key, value in tensors.items() if key.startswith(stem + ".")}  # fmt: skip
    assert moved and not moved.keys() & tensors.keys()
    save_file(tensors | moved, tmp_path / "extra.safetensors")
    torch.save(tensors | moved, tmp_path / "extra.pt")  # a pickle: no word of them
    base_config = {"base_config": files["a"], "allow_pickle": True}
    for name in ("extra.safetensors", "extra.pt"):
        with pytest.warns(UserWarning, match=rf"{name}: 1 of its \d+ layers match no layer of this base"):
            load_base(files["b"], loras=[str(tmp_path / name)], **base_config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_base(files["b"], loras=[str(files[kind])], **base_config)


def test_parts_that_load_without_a_word_and_fail_later_are_refused_at_load(files, tiny_assets, tmp_path):
    """A tokenizer without its config (an OverflowError at the first prompt), a VAE class model_index.json names
    that its weights are not of (a meta-tensor RuntimeError), an upscaler's max_noise_level out of its schedule
    (blamed on the user's --noise-level): each a one-line CheckpointError when the folder loads."""
    import json
    import shutil

    no_config = shutil.copytree(files["a"], tmp_path / "no_config")
    (no_config / "tokenizer" / "tokenizer_config.json").unlink()
    other_vae = shutil.copytree(files["a"], tmp_path / "other_vae")
    index = json.loads((other_vae / "model_index.json").read_text())
    (other_vae / "model_index.json").write_text(json.dumps(index | {"vae": ["diffusers", "AutoencoderTiny"]}))
    for folder, message in ((no_config, "its tokenizer has no usable model_max_length"),
                            (other_vae, r"was not in its files \(does model_index.json name the class")):  # fmt: skip
        with pytest.raises(CheckpointError, match=message):
            load_base(folder)
    upscaler = shutil.copytree(tiny_assets["upscaler"], tmp_path / "x4")
    index = json.loads((upscaler / "model_index.json").read_text())
    for most in (-5, 0, 10**30):
        (upscaler / "model_index.json").write_text(json.dumps(index | {"max_noise_level": most}))
        with pytest.raises(CheckpointError, match=f"max_noise_level {most} must be a whole number in 1 .. 999"):
            load_base(upscaler)
    (upscaler / "model_index.json").write_text(json.dumps(index))
    assert load_base(upscaler).max_noise_level == index["max_noise_level"]  # the control: the folder as made
    assert load_base(files["a"]).tokenizer.model_max_length == 77


def test_a_text_encoder_missing_weights_is_refused_naming_them(files, tmp_path):
    """A folder whose text_encoder files lack a weight its config needs (saved from another shape, an edited file)
    loaded: transformers initialised the weight at random and printed a table, where a UNet or VAE missing one is
    refused. The same from a base_config that a single file takes its text encoder from. The control: the folder
    whole loads its text encoder as it is in the files."""
    import shutil

    folder = shutil.copytree(files["a"], tmp_path / "folder")
    weights = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if k.endswith("fc2.weight"))[0]
    assert torch.equal(load_base(folder).text_encoder.state_dict()[key], tensors[key])
    del tensors[key]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"text_encoder lacks weights of its text encoder: {key}"):
        load_base(folder)
    no_text = tmp_path / "no_text_encoder.safetensors"
    save_file({k: v for k, v in load_file(files["b"]).items() if not k.startswith("cond_stage_model.")}, no_text)
    with pytest.raises(CheckpointError, match=f"base_config {folder}: .*lacks weights of its text encoder: {key}"):
        load_base(no_text, base_config=folder)


def test_an_sdxl_or_inpainting_unet_is_refused_at_load(files, tmp_path):
    """Each loaded as SD's pipeline and failed at the first step, in image mode (a TypeError in diffusers'
    get_aug_embed; a 9-channel conv given 4)."""
    import shutil

    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(files["a"] / "unet"))
    sdxl = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32}  # fmt: skip
    inpaint = {"in_channels": 9}
    for name, change, message in (("sdxl", sdxl, "takes 'text_time' embeddings"),
                                  ("inpaint", inpaint, "takes 9 input channels where the VAE gives 4")):  # fmt: skip
        folder = shutil.copytree(files["a"], tmp_path / name)
        UNet2DConditionModel.from_config(config | change).save_pretrained(folder / "unet")
        with pytest.raises(CheckpointError, match=message):
            load_base(folder)


def test_a_single_file_without_its_vae_or_text_encoder_takes_them_from_base_config(files, tmp_path):
    """A "UNet only" checkpoint was refused with diffusers' Python advice (``vae = AutoencoderKL.from_pretrained``),
    which a command line cannot act on. With base_config the missing part is base_config's (a warning says so) and
    the rest the file's; without base_config, one line names the part. The control: the whole file warns of
    nothing, and its own part differs from base_config's (other seeds), so "taken from base_config" is tested."""
    whole = load_file(files["b"])
    own = load_base(files["b"], base_config=files["a"])
    folder = load_base(files["a"])
    parts = (("VAE", "first_stage_model.", "vae"), ("text encoder", "cond_stage_model.", "text_encoder"))
    for part, prefix, name in parts:
        path = tmp_path / f"no_{name}.safetensors"
        save_file({key: value for key, value in whole.items() if not key.startswith(prefix)}, path)
        with pytest.raises(CheckpointError, match=f"holds no weights of the {part}; pass base_config"):
            load_base(path)
        with pytest.warns(UserWarning, match=f"no weights of the {part}: taken from base_config"):
            pipe = load_base(path, base_config=files["a"])
        for kept, source in ((name, folder), ("unet", own)):
            expected, loaded = getattr(source, kept).state_dict(), getattr(pipe, kept).state_dict()
            assert all(torch.equal(loaded[key], value) for key, value in expected.items()), (part, kept)
        mine, theirs = getattr(own, name).state_dict(), getattr(folder, name).state_dict()
        assert any(not torch.equal(mine[key], value) for key, value in theirs.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_base(files["b"], base_config=files["a"])


def test_parts_taken_from_an_fp16_base_config_are_in_the_dtype_asked_for(files, tmp_path):
    """A single file without its text encoder, its base_config an fp16 folder (SD's "fp16" folders): the text encoder
    was taken in fp16 (transformers keeps the files' dtype) beside a float32 UNet and VAE, where a whole folder loads
    in float32. The control: a dtype given is the dtype of every part."""
    pipe = StableDiffusionPipeline(
        **testing.tiny_sd_components("sd1", seed=0), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", safe_serialization=True)
    path = tmp_path / "unet_only.safetensors"
    parts = ("cond_stage_model.", "first_stage_model.")
    save_file({key: value for key, value in load_file(files["b"]).items() if not key.startswith(parts)}, path)
    for dtype, expected in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        with pytest.warns(UserWarning, match="taken from base_config"):
            base = load_base(path, base_config=tmp_path / "fp16", dtype=dtype)
        found = {name: next(getattr(base, name).parameters()).dtype for name in ("unet", "vae", "text_encoder")}
        assert found == dict.fromkeys(found, expected), (dtype, found)


def test_a_single_file_missing_a_unet_or_vae_weight_says_so(files, tmp_path):
    """A single file lacking one weight of its UNet or VAE (pruned, damaged) was refused with torch's advice, "Cannot
    copy out of meta tensor; no data! Please use torch.nn.Module.to_empty() ...", which a user cannot act on. The
    control: the whole file loads."""
    whole = load_file(files["b"])
    for prefix in ("model.diffusion_model.", "first_stage_model."):
        key = sorted(k for k in whole if k.startswith(prefix) and k.endswith(".weight"))[5]
        path = tmp_path / "pruned.safetensors"
        save_file({k: v for k, v in whole.items() if k != key}, path)
        with pytest.raises(CheckpointError, match="weights of its UNet or VAE are missing from the file") as info:
            load_base(path, base_config=files["a"])
        assert "to_empty" not in str(info.value)
    load_base(files["b"], base_config=files["a"])


def test_a_pickled_single_file_without_its_vae_is_named_and_takes_it_from_base_config(files, tmp_path):
    """A pickle's keys were not listed before it loaded: one without a VAE got diffusers' Python advice. They are now
    read memory-mapped, as diffusers reads the file (``weights_only``, the ``state_dict`` unwrapped). The control:
    the whole pickle warns of nothing, and a legacy-format pickle (its keys not listable) still loads."""
    whole = load_file(files["b"])
    no_vae = tmp_path / "no_vae.ckpt"
    torch.save({"state_dict": {k: v for k, v in whole.items() if not k.startswith("first_stage_model.")}}, no_vae)
    with pytest.raises(CheckpointError, match="holds no weights of the VAE; pass base_config"):
        load_base(no_vae, allow_pickle=True)
    with pytest.warns(UserWarning, match="no weights of the VAE: taken from base_config"):
        pipe = load_base(no_vae, base_config=files["a"], allow_pickle=True)
    expected = load_base(files["a"]).vae.state_dict()
    assert all(torch.equal(pipe.vae.state_dict()[key], value) for key, value in expected.items())
    for name, zipped in (("legacy.ckpt", False), ("whole.ckpt", True)):
        path = tmp_path / name
        torch.save({"state_dict": whole}, path, _use_new_zipfile_serialization=zipped)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_base(path, base_config=files["a"], allow_pickle=True)


def test_a_single_file_without_unet_weights_is_one_line_naming_it(files, tmp_path):
    """A .ckpt (or .safetensors) of the VAE and text encoder alone got diffusers' Python advice ("unet =
    UNet2DConditionModel.from_pretrained(...)"), or with no base_config an attempt to reach the Hub."""
    rest = {k: v for k, v in load_file(files["b"]).items() if not k.startswith("model.diffusion_model.")}
    torch.save({"state_dict": rest}, tmp_path / "no_unet.ckpt")
    save_file(rest, tmp_path / "no_unet.safetensors")
    for name in ("no_unet.ckpt", "no_unet.safetensors"):
        for base_config in (None, files["a"]):
            with pytest.raises(CheckpointError, match=f"{name} holds no UNet weights") as error:
                load_base(tmp_path / name, base_config=base_config, allow_pickle=True)
            assert "model.diffusion_model.* tensors" in str(error.value) and "\n" not in str(error.value)


def test_a_single_file_has_its_tensor_names_listed_once_before_diffusers_loads_it(files, tmp_path, monkeypatch):
    """load_single_file listed a checkpoint's tensors twice: check_weights_file read each one, then the file was
    opened again for the names that say which parts it holds. The check's names are used now; what they decide is
    unchanged (test_a_single_file_without_its_vae_or_text_encoder_takes_them_from_base_config)."""
    import safetensors

    from lvdm.models import loading, single_file

    listed = []

    class Counted:  # safe_open, recording each listing of a file's tensor names
        def __init__(self, path, **kwargs):
            self.name, self.handle = Path(path).name, safetensors.safe_open(path, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            listed.append(self.name)
            return self.handle.keys()

        def __getattr__(self, name):
            return getattr(self.handle, name)

    for module in (loading, single_file):  # single_file opened it itself, for the names
        monkeypatch.setattr(module, "safe_open", Counted, raising=False)
    base = load_base(files["b"], base_config=files["a"])
    assert listed == [files["b"].name]
    assert base.unet is not None and base.vae is not None
