"""The tiny offline SD stand-ins: seeded, input-dependent, and loadable by diffusers' own loaders."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from lvdm import testing

FACTORIES = {
    "unet_sd1": lambda seed: testing.tiny_unet("sd1", seed),
    "unet_sd2": lambda seed: testing.tiny_unet("sd2", seed),
    "vae": testing.tiny_vae,
    "text_encoder_sd1": lambda seed: testing.tiny_text_encoder("sd1", seed),
    "text_encoder_sd2": lambda seed: testing.tiny_text_encoder("sd2", seed),
    "upscaler_unet": testing.tiny_upscaler_unet,
    "clip_vision": testing.tiny_clip_vision,
}
MODELS = ("unet", "vae", "text_encoder")
LORA_MARKERS = {  # a key prefix each layout must contain
    "kohya": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.",
    "peft": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.",
}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every tensor of the two state dicts is exactly equal, with the same keys."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def encode(components: dict, prompts: list[str]) -> torch.Tensor:
    """(b, 77, 32) text embeddings from the tiny tokenizer + text encoder."""
    tokens = components["tokenizer"](prompts, padding="max_length", max_length=77, return_tensors="pt")
    return components["text_encoder"](tokens.input_ids).last_hidden_state


def unet_out(unet: UNet2DConditionModel, seed: int = 1) -> torch.Tensor:
    """UNet prediction on fixed random latents and context."""
    gen = torch.Generator().manual_seed(seed)
    latents, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    return unet(latents, 500, encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def components() -> dict[str, dict]:
    return {flavour: testing.tiny_sd_components(flavour) for flavour in testing.FLAVOURS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_sd")
    return {flavour: testing.make_tiny_sd(root / flavour, flavour) for flavour in testing.FLAVOURS}


@pytest.mark.parametrize("name", FACTORIES)
def test_seed_fixes_weights(name: str) -> None:
    factory = FACTORIES[name]
    assert_same_weights(factory(0), factory(0))
    a, b = factory(0).state_dict(), factory(1).state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a if not k.endswith("position_ids"))


def test_building_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    testing.tiny_unet()
    assert torch.equal(torch.rand(3), expected)


def test_no_parameter_is_zero(components: dict) -> None:
    for flavour, parts in components.items():
        for name in MODELS:
            zeros = [k for k, p in parts[name].named_parameters() if not p.abs().sum()]
            assert not zeros, (flavour, name, zeros[:5])


def test_tokenizer_pads_to_77_with_clip_specials(components: dict) -> None:
    tokenizer, text_encoder = components["sd1"]["tokenizer"], components["sd1"]["text_encoder"]
    ids = tokenizer("a red ball", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and tokenizer.model_max_length == 77
    assert ids[0] == tokenizer.bos_token_id == text_encoder.config.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id == text_encoder.config.eos_token_id
    assert len(tokenizer) == text_encoder.config.vocab_size == 514
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red ball"


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_unet_output_depends_on_latents_and_text(components: dict, flavour: str) -> None:
    unet = components[flavour]["unet"]
    context = encode(components[flavour], ["a red ball", "a red ball"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(latents, 500, encoder_hidden_states=context).sample
        other_text = unet(latents, 500, encoder_hidden_states=encode(components[flavour], ["a", "a"])).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert 0.1 < out.std() < 10
    assert not torch.allclose(out[0], out[1])  # different latents
    assert not torch.allclose(out, other_text)  # different prompt


def test_flavours_match_sd_structure(components: dict) -> None:
    sd1, sd2 = components["sd1"]["unet"].config, components["sd2"]["unet"].config
    assert not sd1.use_linear_projection and sd2.use_linear_projection and sd2.upcast_attention
    assert len(sd1.block_out_channels) == 2 and len(sd2.block_out_channels) == 3
    assert components["sd1"]["text_encoder"].config.hidden_act == "quick_gelu"
    assert components["sd2"]["text_encoder"].config.hidden_act == "gelu"
    vae = components["sd1"]["vae"]
    assert vae.config.scaling_factor == 0.18215
    assert vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean.shape == (1, 4, 8, 8)  # downscale factor 2


@pytest.mark.parametrize(("flavour", "prediction"), [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_scheduler_is_sd_schedule(flavour: str, prediction: str) -> None:
    scheduler = testing.tiny_scheduler(flavour)
    assert scheduler.config.prediction_type == prediction
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(scheduler.betas, expected)


def test_unknown_flavour_suggests_name() -> None:
    with pytest.raises(ValueError, match="Did you mean 'sd1'"):
        testing.tiny_unet("sd11")


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_folder_loads_back_equal(components: dict, folders: dict, flavour: str) -> None:
    folder = folders[flavour]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert all(list((folder / name).glob("*.safetensors")) for name in MODELS)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    for name in MODELS:
        assert_same_weights(getattr(pipe, name), components[flavour][name])
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    assert_same_weights(unet, components[flavour]["unet"])
    assert pipe.scheduler.config.prediction_type == testing.FLAVOURS[flavour].prediction_type
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red ball", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_single_file_round_trip_is_exact(components: dict, folders: dict, tmp_path: Path) -> None:
    path = testing.write_single_file_checkpoint(components["sd1"], tmp_path / "dreambooth.safetensors")
    state = load_file(path)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in state)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in state  # upsampler after an UpBlock2D level
    config = str(folders["sd1"])  # must be a str: diffusers rejects a Path for `config`
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=config, local_files_only=True, safety_checker=None
    )
    for name in MODELS:
        assert_same_weights(getattr(pipe, name), components["sd1"][name])
    unet = UNet2DConditionModel.from_single_file(str(path), config=config, subfolder="unet", local_files_only=True)
    assert_same_weights(unet, components["sd1"]["unet"])
    vae = AutoencoderKL.from_single_file(str(path), config=config, subfolder="vae", local_files_only=True)
    assert_same_weights(vae, components["sd1"]["vae"])


def test_single_file_rejects_sd2(components: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only the SD1 flavour"):
        testing.write_single_file_checkpoint(components["sd2"], tmp_path / "sd2.safetensors")


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_lora_formats_load_and_agree(folders: dict, tmp_path: Path, flavour: str) -> None:
    outputs = {}
    for fmt, marker in LORA_MARKERS.items():
        pipe = StableDiffusionPipeline.from_pretrained(folders[flavour], safety_checker=None, local_files_only=True)
        with torch.no_grad():
            base = unet_out(pipe.unet)
        path = testing.write_lora(pipe.unet, tmp_path / f"{fmt}.safetensors", format=fmt)
        assert any(key.startswith(marker) for key in load_file(path))
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            outputs[fmt] = unet_out(pipe.unet)
        assert (outputs[fmt] - base).abs().mean() > 1e-2 * base.abs().mean()
    torch.testing.assert_close(outputs["kohya"], outputs["peft"])  # same seed -> same LoRA in both layouts


def test_lora_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown LoRA format"):
        testing.write_lora(testing.tiny_unet(), tmp_path / "x.safetensors", format="lycoris")


def test_upscaler_unet_uses_noise_level() -> None:
    unet = testing.tiny_upscaler_unet()
    assert unet.config.in_channels == 7 and unet.config.num_class_embeds == 1000
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 7, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        low = unet(sample, 10, encoder_hidden_states=context, class_labels=torch.tensor([20])).sample
        high = unet(sample, 10, encoder_hidden_states=context, class_labels=torch.tensor([350])).sample
    assert low.shape == (1, 4, 8, 8) and not torch.allclose(low, high)


def test_clip_vision_embeds_images() -> None:
    model = testing.tiny_clip_vision()
    with torch.no_grad():
        embeds = model(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).image_embeds
    assert embeds.shape == (2, 32) and not torch.allclose(embeds[0], embeds[1])
