"""The two seams (the video model's registry of added modules, the trainer's objective) and the fixes that came
with them: EMA warm-up, image mode under fp16, stochastic samplers under the mixed prior, the noise prior recorded
in module files, image batches with nothing on the image path to train."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides, video_inputs
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file
from torch import nn

from lvdm import testing
from lvdm.config import load_config
from lvdm.diffusion import SAMPLERS
from lvdm.errors import ConfigError, TemporalModuleError
from lvdm.models import VideoUNet, load_base
from lvdm.models import parts as parts_module
from lvdm.models.parts import PartKind
from lvdm.modules.alpha_blend import FrameAlphaBlender
from lvdm.modules.frame_context import current_frames
from lvdm.modules.video_cross_attention import VideoCrossAttnProcessor, cross_attentions
from lvdm.training import objectives
from lvdm.training.ema import EMA
from lvdm.training.trainer import Trainer, train


# --------------------------------------------------------------------------------------------- a standalone part
class FrameBias(nn.Module):
    """A test part: a learned bias per frame position added to the UNet's first feature map through a hook.

    Nothing in the wrappers knows it exists; it reaches the model only through the registry and a hook its
    builder installs, the way an FPS embedding or a context encoder would.
    """

    inputs = ("bias_scale",)

    def __init__(self, channels: int, max_frames: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(max_frames, channels))

    def prepare(self, context, sample, timestep, bias_scale: float = 1.0) -> torch.Tensor:
        # f c -> (b f) c 1 1
        bias = self.table[: context.num_frames] * bias_scale
        return bias.repeat(context.batch_size, 1)[:, :, None, None]


def build_frame_bias(video: VideoUNet, *, max_frames: int) -> FrameBias:
    part = FrameBias(video.unet.config.block_out_channels[0], max_frames)

    def add_bias(module, args, output):
        return output + current_frames().extras["frame_bias"].to(output.dtype)

    video.unet.conv_in.register_forward_hook(add_bias)
    return part


@pytest.fixture
def frame_bias_kind(monkeypatch):
    kind = PartKind(build=build_frame_bias, from_config=lambda model: {"max_frames": 8})
    monkeypatch.setitem(parts_module.PART_KINDS, "frame_bias", kind)
    return kind


def test_a_part_is_in_every_view_of_the_registry(frame_bias_kind):
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=0))
    wrappers_only = dict(video.named_temporal_parameters())
    parts_module.build_part(video, "frame_bias", "frame_bias", {"max_frames": 8})
    video.freeze_base()
    named = dict(video.named_temporal_parameters())
    assert set(named) - set(wrappers_only) == {"parts.frame_bias.table"}
    assert named["parts.frame_bias.table"].requires_grad
    assert "parts.frame_bias" in video.added_modules()
    base_ids = {id(p) for p in video.base_parameters()}
    assert id(named["parts.frame_bias.table"]) not in base_ids
    assert not any(p.requires_grad for p in video.base_parameters())
    sample, timestep, text = video_inputs(video.unet, f=3)
    before = video(sample, timestep, text)
    with torch.no_grad():
        named["parts.frame_bias.table"].fill_(0.5)
    assert not torch.allclose(video(sample, timestep, text), before)  # the part reaches the output
    assert not torch.allclose(video(sample, timestep, text, bias_scale=0.0), video(sample, timestep, text))
    with pytest.raises(TypeError, match="bias_scale"):
        video(sample, timestep, text, fps=8)


def test_a_part_trains_saves_loads_onto_another_base_and_resumes_exactly(frame_bias_kind, tiny_assets, tmp_path):
    whole = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "whole")), progress=False)
    train(load_config([], tiny_overrides(tiny_assets, tmp_path / "split", **{"train.max_steps": 2})), progress=False)
    resumed = load_config([], tiny_overrides(tiny_assets, tmp_path / "split", **{"train.resume": "auto"}))
    train(resumed, progress=False)
    a = load_file(whole.temporal_path)
    b = load_file(tmp_path / "split" / "temporal.safetensors")
    assert a.keys() == b.keys() and "parts.frame_bias.table" in a
    assert a["parts.frame_bias.table"].abs().sum() > 0  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)  # resume is exact, the part included

    other = load_base(testing.make_tiny_sd(tmp_path / "other", "sd1", seed=5)).unet
    video = VideoUNet.from_temporal_file(other, whole.temporal_path)  # rebuilt from the file's metadata
    assert video.part_specs["frame_bias"].config == {"max_frames": 8}
    assert torch.equal(dict(video.named_temporal_parameters())["parts.frame_bias.table"], a["parts.frame_bias.table"])
    plain = VideoUNet.from_unet2d(load_base(testing.make_tiny_sd(tmp_path / "plain", "sd1", seed=5)).unet)
    with pytest.raises(TemporalModuleError, match="standalone parts differ"):
        plain.load_temporal(whole.temporal_path)


def test_attention_backend_keeps_processors_other_parts_installed():
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=0))

    class ExtraKV(AttnProcessor2_0, nn.Module):  # a processor with weights, like the image cross-attention's
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.scale = nn.Parameter(torch.ones(()))

    attentions = [m for m in video.modules() if isinstance(m, Attention)]
    custom = ExtraKV()
    attentions[0].set_processor(custom)
    assert video.set_attention_backend("sdpa") is video
    assert attentions[0].processor is custom
    cross = {id(attn) for _, attn in cross_attentions(video.unet)}  # these project the text once per video
    for attn in attentions[1:]:
        assert type(attn.processor) is (VideoCrossAttnProcessor if id(attn) in cross else AttnProcessor2_0)


# --------------------------------------------------------------------------------------------- the objective seam
def test_train_target_selects_the_objective_and_unknown_targets_are_config_errors(tiny_assets, tmp_path):
    assert objectives.OBJECTIVES["denoise"] is objectives.DenoisingObjective
    with pytest.raises(ConfigError, match="train.target"):
        load_config([], tiny_overrides(tiny_assets, tmp_path / "x", **{"train.target": "denoize"}))


def test_an_objectives_own_state_is_checkpointed_and_restored(tiny_assets, tmp_path, monkeypatch):
    """An objective owning an extra model and optimizer (a discriminator, say): checkpoints carry it, resume
    restores it exactly, and its figures are logged."""

    class WithCritic(objectives.DenoisingObjective):
        name = "denoise"

        def __init__(self, *args) -> None:
            super().__init__(*args)
            generator = torch.Generator().manual_seed(0)
            self.critic = nn.Linear(4, 1)
            with torch.no_grad():
                self.critic.weight.copy_(torch.randn(self.critic.weight.shape, generator=generator))
            self.critic_opt = torch.optim.SGD(self.critic.parameters(), lr=0.1, momentum=0.9)

        def after_step(self, step: int) -> dict[str, float]:
            loss = self.critic(torch.full((1, 4), float(step))).pow(2).mean()
            self.critic_opt.zero_grad()
            loss.backward()
            self.critic_opt.step()
            return {"critic_loss": float(loss.detach())}

        def state_dict(self):
            return {"critic": self.critic.state_dict(), "critic_opt": self.critic_opt.state_dict()}

        def load_state_dict(self, state) -> None:
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])

    monkeypatch.setitem(objectives.OBJECTIVES, "denoise", WithCritic)
    whole = Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "whole")), progress=False)
    whole.run()
    Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "split", **{"train.max_steps": 2})),
            progress=False).run()  # fmt: skip
    resumed = Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "split", **{"train.resume": "auto"})),
                      progress=False)  # fmt: skip
    assert resumed.step == 2
    resumed.run()
    assert torch.equal(whole.objective.critic.weight, resumed.objective.critic.weight)
    from lvdm.training.logs import read_log

    assert any("critic_loss" in record for record in read_log(tmp_path / "whole" / "log.jsonl"))


# --------------------------------------------------------------------------------------------- the fixes
def test_ema_warms_up_so_early_exports_reflect_training():
    param = nn.Parameter(torch.zeros(3))
    ema = EMA([("w", param)], decay=0.9999)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update(0)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.9999
    torch.testing.assert_close(ema.weights()["w"], torch.full((3,), 0.9))  # 0.1 * 0 + 0.9 * 1
    for step in range(1, 1000):
        ema.update(step)
    assert float(ema.weights()["w"][0]) > 0.99  # without the warm-up: 1 - 0.9999 ** 1000 = 0.095


def test_image_frames_take_the_spatial_output_even_when_the_temporal_branch_overflows():
    blender = FrameAlphaBlender(0.5).half()
    spatial = torch.randn(4, 3, 2, 2).half()
    temporal = torch.full_like(spatial, float("inf"))
    flags = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # (b, f): frames 0, 1, 3 are images
    out = blender(spatial, temporal, flags)
    images = flags.reshape(-1).bool()
    assert torch.equal(out[images], spatial[images])  # 1 * s + 0 * inf would be NaN
    assert not torch.isfinite(out[~images]).any()


def test_images_are_refused_when_nothing_on_the_image_path_trains(tiny_assets, tmp_path):
    sources = f"[{{kind: folder, path: '{tiny_assets['clips']}'}}, {{kind: images, path: '{tiny_assets['images']}'}}]"
    overrides = [o for o in tiny_overrides(tiny_assets, tmp_path / "run") if not o.startswith("data.root")]
    with pytest.raises(ConfigError, match="spatial_lora_rank or model.unfreeze"):
        load_config([], [*overrides, f"data.sources={sources}"])
    with pytest.raises(ConfigError, match="image_batch_ratio"):
        load_config([], [*overrides, f"data.sources={sources}", "train.image_batch_ratio=0.3"])
    load_config([], [*overrides, f"data.sources={sources}", "train.image_batch_ratio=0"])  # no images drawn
    load_config([], [*overrides, f"data.sources={sources}", "model.spatial_lora_rank=2"])
    load_config([], [*overrides, f"data.sources={sources}", "model.unfreeze=[up_blocks.1]"])


@pytest.mark.parametrize("scheduler", ["ddpm", "euler_a"])
def test_stochastic_samplers_draw_their_step_noise_from_the_prior(scheduler):
    from lvdm.diffusion import make_scheduler, sample, step_noise_for

    def zero(x, t, **cond):
        return torch.zeros_like(x)

    def frame_correlation(prior: str) -> float:
        # a model predicting zero noise from zero latents: all that is left at the end is the per-step noise
        result = sample(
            zero, make_scheduler(scheduler, testing.tiny_scheduler("sd1").config), latents=torch.zeros(2, 4, 6, 8, 8),
            num_inference_steps=8, cond={}, generator=torch.Generator().manual_seed(0),
            step_noise=step_noise_for(prior, 0.5), progress=False,
        )  # fmt: skip
        pairs = torch.stack([result[:, :, :-1].flatten(), result[:, :, 1:].flatten()])
        return float(torch.corrcoef(pairs)[0, 1])

    assert abs(frame_correlation("independent")) < 0.05
    assert 0.4 < frame_correlation("mixed") < 0.6  # lambda = 0.5 is the correlation between two frames


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_samples_under_a_noise_prior(name):
    """UniPC under the mixed prior (the shipped text-to-video configs') was a traceback telling the user to use
    UniPC: its module has no ``randn_tensor`` to route step noise through, and none to route (it draws none). The
    stochastic ones follow the prior: their result depends on it."""
    from lvdm.diffusion import make_scheduler, sample, step_noise_for

    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(step_noise):
        return sample(lambda x_t, t: 0.5 * torch.tanh(x_t), make_scheduler(name, testing.tiny_scheduler("sd1").config),
                      latents=noise, num_inference_steps=4, cond={}, generator=torch.Generator().manual_seed(1),
                      step_noise=step_noise, progress=False)  # fmt: skip

    mixed, independent = run(step_noise_for("mixed", 0.5)), run(None)
    assert torch.isfinite(mixed).all()
    assert torch.equal(mixed, independent) == (name not in ("ddpm", "euler_a")), name  # deterministic: no step noise


def test_a_stochastic_scheduler_without_randn_tensor_is_refused_under_a_prior(monkeypatch):
    """The control: a scheduler that does draw noise (its step takes a generator) in a module lvdm cannot route is
    still refused, not sampled with i.i.d. noise."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    from lvdm.diffusion import make_scheduler, sample, step_noise_for

    monkeypatch.delattr(ddpm_module, "randn_tensor")
    scheduler = make_scheduler("ddpm", testing.tiny_scheduler("sd1").config)
    with pytest.raises(ValueError, match="cannot route through a noise prior"):
        sample(lambda x_t, t: x_t, scheduler, latents=torch.zeros(1, 4, 3, 8, 8), num_inference_steps=2, cond={},
               step_noise=step_noise_for("mixed"), progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("train_section", "expected"),
    [
        ({"noise_prior": "mixed", "mixed_noise_lambda": 0.3}, ("mixed", 0.3)),
        ({"noise_prior": "independent", "mixed_noise_lambda": 0.5}, ("independent", 0.5)),
        ({}, ("independent", 0.5)),  # a module from before: the sampler's own defaults
    ],
)
def test_sampling_draws_noise_like_the_module_was_trained(tmp_path, train_section, expected):
    from lvdm import VideoPipeline

    folder = testing.make_tiny_sd(tmp_path / "base", "sd1", seed=0)
    module = tmp_path / "motion.safetensors"
    training_config = {"data": {"num_frames": 3, "resolution": [16, 16]}, "train": train_section}
    VideoUNet.from_unet2d(load_base(folder).unet).save_temporal(module, training_config=training_config)
    pipe = VideoPipeline.from_pretrained(folder, temporal=module)
    out = pipe("a fox", seed=0, num_inference_steps=1, guidance_scale=1.0)
    settings = out.metadata[0]["settings"]
    assert (settings["noise_prior"], settings["mixed_lambda"]) == expected
    chosen = pipe("a fox", seed=0, num_inference_steps=1, guidance_scale=1.0, noise_prior="independent")
    assert chosen.metadata[0]["settings"]["noise_prior"] == "independent"  # the user's choice wins


def test_resume_refuses_another_target_but_not_a_checkpoint_from_before_targets_existed():
    from lvdm.training.run_dir import compare_on_resume

    current = {"train": {"target": "denoise", "lr": 1e-4}}
    compare_on_resume({"train": {"lr": 1e-4}}, current)  # written before train.target existed: the same meaning
    with pytest.raises(ConfigError, match="train.target: 'distill' in the checkpoint, 'denoise' now"):
        compare_on_resume({"train": {"target": "distill", "lr": 1e-4}}, current)
