"""Diffusion math: noise priors, training loss, classifier-free guidance and sampling loops.

Every test uses toy callables in place of the network (the diffusion code takes ``model_fn`` as an argument).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from lvdm.diffusion import (
    GUIDANCE_SCHEDULES,
    NOISE_PRIORS,
    SAMPLERS,
    classifier_free_guidance,
    diffusion_loss,
    guidance_schedule,
    make_scheduler,
    min_snr_weights,
    prediction_target,
    sample,
    sample_noise,
    snr,
    threshold_x0,
)
from lvdm.diffusion.sampling import LATENT_DEFAULTS
from lvdm.errors import ConfigError

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
PREDICTION_TYPES = ["epsilon", "v_prediction"]
DIRECT = {  # each sampler built directly from the same kwargs, not through from_config
    "ddim": lambda **kw: DDIMScheduler(**kw),
    "ddim_trailing": lambda **kw: DDIMScheduler(**kw, timestep_spacing="trailing"),
    "dpmpp": lambda **kw: DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++"),
    "euler": lambda **kw: EulerDiscreteScheduler(**kw),
    "euler_a": lambda **kw: EulerAncestralDiscreteScheduler(**kw),
    "ddpm": lambda **kw: DDPMScheduler(**kw),
    "unipc": lambda **kw: UniPCMultistepScheduler(**kw),
}


def base_scheduler(prediction_type: str) -> DDIMScheduler:
    """SD's betas; DDIM's last step ends at alpha 1 (stated: unstated, lvdm takes SD's alphas[0]), so that an oracle's
    samples are its x0 exactly."""
    return DDIMScheduler(**SD_BETAS, prediction_type=prediction_type, set_alpha_to_one=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def frame_corr(noise: torch.Tensor, i: int, j: int) -> float:
    """Empirical correlation between frames ``i`` and ``j`` over every (b, c, h, w) position."""
    return (noise[:, :, i] * noise[:, :, j]).mean().item()


# ---------------------------------------------------------------- noise


def test_noise_priors_registry():
    assert set(NOISE_PRIORS) == {"independent", "mixed"}
    with pytest.raises(ValueError, match="independent.*mixed"):
        sample_noise((1, 4, 2, 8, 8), prior="videofusion")


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.8])
def test_mixed_prior_unit_variance_and_frame_correlation(lam):
    noise = sample_noise((1000, 4, 4, 8, 8), prior="mixed", mixed_lambda=lam, generator=gen(0))
    assert noise.shape == (1000, 4, 4, 8, 8) and noise.dtype == torch.float32
    per_element_var = noise.var(dim=0)  # over videos, for each (c, f, h, w)
    assert per_element_var.mean().item() == pytest.approx(1.0, abs=0.01)
    assert (per_element_var - 1).abs().max().item() < 0.25
    for i, j in [(0, 1), (0, 3), (2, 3)]:
        assert frame_corr(noise, i, j) == pytest.approx(lam, abs=0.02)


def test_independent_prior_is_uncorrelated_across_frames():
    noise = sample_noise((1000, 4, 3, 8, 8), generator=gen(0))
    assert noise.var().item() == pytest.approx(1.0, abs=0.01)
    assert frame_corr(noise, 0, 1) == pytest.approx(0.0, abs=0.02)


def test_fixed_base_noise_with_different_residuals_correlates():
    lam = 0.6
    base = torch.randn(500, 4, 1, 8, 8, generator=gen(0))
    first = sample_noise((500, 4, 3, 8, 8), prior="mixed", mixed_lambda=lam, base_noise=base, generator=gen(1))
    second = sample_noise((500, 4, 3, 8, 8), prior="mixed", mixed_lambda=lam, base_noise=base, generator=gen(2))
    assert not torch.equal(first, second)
    assert (first * second).mean().item() == pytest.approx(lam, abs=0.02)
    only_base = sample_noise((500, 4, 3, 8, 8), prior="mixed", mixed_lambda=1.0, base_noise=base, generator=gen(1))
    torch.testing.assert_close(only_base, base.expand(-1, -1, 3, -1, -1))


def test_base_noise_is_checked():
    with pytest.raises(ValueError, match=r"\(b, c, 1, h, w\)"):
        sample_noise((2, 4, 3, 8, 8), prior="mixed", base_noise=torch.zeros(2, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="mixed"):
        sample_noise((2, 4, 3, 8, 8), base_noise=torch.zeros(2, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="mixed_lambda"):
        sample_noise((2, 4, 3, 8, 8), prior="mixed", mixed_lambda=1.5)


def test_offset_noise_is_one_value_per_video_and_channel():
    shape, offset = (2000, 4, 3, 4, 4), 0.5
    plain = sample_noise(shape, generator=gen(0))
    with_offset = sample_noise(shape, offset_noise=offset, generator=gen(0))
    assert with_offset.shape == shape
    diff = with_offset - plain  # the offset term: the per-element noise is drawn first, from the same generator
    torch.testing.assert_close(diff, diff[:, :, :1, :1, :1].expand(shape))
    assert diff[:, :, 0, 0, 0].std().item() == pytest.approx(offset, abs=0.02)
    expected = offset**2 / (1 + offset**2)  # frames share the offset: correlation of unit-normalised frames
    assert frame_corr(with_offset, 0, 2) / with_offset.var().item() == pytest.approx(expected, abs=0.02)


def test_noise_dtype_and_reproducibility():
    a = sample_noise((2, 4, 3, 8, 8), prior="mixed", generator=gen(3), dtype=torch.bfloat16)
    b = sample_noise((2, 4, 3, 8, 8), prior="mixed", generator=gen(3), dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


# ---------------------------------------------------------------- loss


def zero_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_t)


def toy_video(seed: int = 0, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(b, 4, 3, 8, 8, generator=g), torch.randn(b, 4, 3, 8, 8, generator=g)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_target(prediction_type):
    scheduler = base_scheduler(prediction_type)
    latents, noise = toy_video()
    t = torch.tensor([0, 500, 999])
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(prediction_target(scheduler, latents, noise, t), expected, rtol=0, atol=0)
    assert torch.equal(prediction_target(base_scheduler("sample"), latents, noise, t), latents)


def test_unknown_prediction_type_raises():
    scheduler = base_scheduler("epsilon")
    scheduler.register_to_config(prediction_type="flow")
    latents, noise = toy_video()
    with pytest.raises(ValueError, match="flow"):
        prediction_target(scheduler, latents, noise, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_is_zero_for_a_model_that_knows_the_answer(prediction_type):
    scheduler = base_scheduler(prediction_type)
    latents, noise = toy_video()
    seen = {}

    def cheat(x_t, t, encoder_hidden_states):
        seen["x_t"], seen["text"] = x_t, encoder_hidden_states
        return prediction_target(scheduler, latents, noise, t).to(torch.bfloat16).float()

    text = torch.randn(3, 7, 16)
    terms = diffusion_loss(cheat, latents, scheduler, noise=noise, generator=gen(0), encoder_hidden_states=text)
    assert seen["text"] is text
    torch.testing.assert_close(seen["x_t"], scheduler.add_noise(latents, noise, terms.timesteps))
    # exact up to the bf16 round trip of the cheating answer
    assert terms.loss.shape == (3,) and terms.loss.max().item() < 1e-4

    def exact_answer(x_t, t):
        return prediction_target(scheduler, latents, noise, t)

    exact = diffusion_loss(exact_answer, latents, scheduler, noise=noise, generator=gen(0))
    assert torch.equal(exact.loss, torch.zeros(3))
    wrong = diffusion_loss(zero_model, latents, scheduler, noise=noise, generator=gen(0))
    assert (wrong.loss > 0).all()
    torch.testing.assert_close(wrong.loss, wrong.target.square().mean(dim=(1, 2, 3, 4)))


def test_loss_is_float32_for_a_bf16_model():
    scheduler = base_scheduler("epsilon")
    latents, _ = toy_video()
    terms = diffusion_loss(lambda x, t: x.to(torch.bfloat16), latents, scheduler, generator=gen(0))
    assert {terms.loss.dtype, terms.prediction.dtype, terms.target.dtype, terms.weights.dtype} == {torch.float32}


def test_timesteps_are_reproducible_from_the_generator():
    scheduler = base_scheduler("epsilon")
    latents, _ = toy_video(b=64)
    zero = zero_model
    first = diffusion_loss(zero, latents, scheduler, generator=gen(7))
    again = diffusion_loss(zero, latents, scheduler, generator=gen(7), noise=torch.zeros_like(latents))
    other = diffusion_loss(zero, latents, scheduler, generator=gen(8))
    assert torch.equal(first.timesteps, again.timesteps)
    assert torch.equal(first.target, diffusion_loss(zero, latents, scheduler, generator=gen(7)).target)
    assert not torch.equal(first.timesteps, other.timesteps)
    assert first.timesteps.dtype == torch.long
    assert 0 <= first.timesteps.min() and first.timesteps.max() < 1000


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_follow_the_formula(prediction_type):
    gamma = 5.0
    scheduler = base_scheduler(prediction_type)
    t = torch.arange(0, 1000, 37)
    alpha_bar = scheduler.alphas_cumprod[t]
    ratio = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(snr(scheduler, t), ratio)
    clipped = torch.minimum(ratio, torch.full_like(ratio, gamma))
    expected = clipped / ratio if prediction_type == "epsilon" else clipped / (ratio + 1)
    weights = min_snr_weights(scheduler, t, gamma)
    torch.testing.assert_close(weights, expected)
    if prediction_type == "epsilon":
        assert (weights <= 1).all()
    latents, noise = toy_video(b=len(t))
    terms = diffusion_loss(zero_model, latents, scheduler, noise=noise, timesteps=t, snr_gamma=gamma)
    torch.testing.assert_close(terms.weights, expected)
    torch.testing.assert_close(terms.loss, terms.target.square().mean(dim=(1, 2, 3, 4)) * expected)
    torch.testing.assert_close(min_snr_weights(base_scheduler("sample"), t, gamma), clipped)


# ---------------------------------------------------------------- guidance


class CountingModel:
    """A model whose output depends nonlinearly on x_t, t and every conditioning input."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x_t, t, encoder_hidden_states, image_only_indicator):
        self.batches.append(x_t.shape[0])
        text = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None, None]
        flag = image_only_indicator.float()[:, None, None, None, None]
        return torch.tanh(x_t * (1 + text)) + t.float()[:, None, None, None, None] / 1000 + flag


def guidance_inputs(b: int = 2):
    g = gen(0)
    x = torch.randn(b, 4, 3, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(b, 7, 16, generator=g), "image_only_indicator": torch.tensor([0, 1])}
    uncond = {"encoder_hidden_states": torch.zeros(b, 7, 16)}
    return x, torch.tensor([10, 900]), cond, uncond


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_batched_cfg_equals_two_separate_passes(rescale):
    x, t, cond, uncond = guidance_inputs()
    model = CountingModel()
    guided = classifier_free_guidance(model, scale_at=guidance_schedule("constant", 7.5), rescale=rescale)
    out = guided(x, t, cond=cond, uncond=uncond, step_index=0, num_steps=10)
    assert model.batches == [4]

    c = model(x, t, **cond)
    u = model(x, t, **{**cond, **uncond})
    expected = u + 7.5 * (c - u)
    if rescale:
        std_ratio = c.std(dim=(1, 2, 3, 4), keepdim=True) / expected.std(dim=(1, 2, 3, 4), keepdim=True)
        expected = rescale * expected * std_ratio + (1 - rescale) * expected
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_weight_one_runs_only_the_conditional_pass():
    x, t, cond, uncond = guidance_inputs()
    model = CountingModel()
    guided = classifier_free_guidance(model, scale_at=guidance_schedule("oscillating", 5.0, low=1.0, warmup=0.0))
    out = guided(x, t, cond=cond, uncond=uncond, step_index=1, num_steps=10)  # the low (1.0) step
    assert model.batches == [2]
    torch.testing.assert_close(out, model(x, t, **cond), rtol=0, atol=0)
    guided(x, t, cond=cond, uncond=None, step_index=1, num_steps=10)  # uncond not needed at w == 1
    with pytest.raises(ValueError, match="uncond"):
        guided(x, t, cond=cond, uncond=None, step_index=0, num_steps=10)


def test_cfg_rejects_conditions_it_cannot_batch():
    x, t, cond, _ = guidance_inputs()
    guided = classifier_free_guidance(CountingModel(), scale_at=guidance_schedule("constant", 3.0))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        guided(x, t, cond=cond, uncond={"encoder_hidden_states": torch.zeros(1, 7, 16)}, step_index=0, num_steps=1)
    with pytest.raises(ValueError, match="lacks"):
        guided(x, t, cond=cond, uncond={"fps": torch.zeros(2)}, step_index=0, num_steps=1)


def test_oscillating_default_is_imagen_videos_rule_in_lvdms_convention():
    """Imagen Video alternates w = 15 and w = 1 in (1 + w) c - w u; lvdm's u + s (c - u) has s = 1 + w."""
    x, t, cond, uncond = guidance_inputs()
    model = CountingModel()
    u, c = model(x, t, **{**cond, **uncond}), model(x, t, **cond)
    imagen = {15.0: (1 + 15.0) * c - 15.0 * u, 1.0: (1 + 1.0) * c - 1.0 * u}
    schedule = guidance_schedule("oscillating", 16.0, warmup=0.0)  # the default low
    guided = classifier_free_guidance(model, scale_at=schedule)
    for step, w in ((0, 15.0), (1, 1.0)):
        out = guided(x, t, cond=cond, uncond=uncond, step_index=step, num_steps=10)
        torch.testing.assert_close(out, imagen[w], rtol=1e-5, atol=1e-5 * float(imagen[w].abs().max()))


def test_guidance_schedules():
    assert set(GUIDANCE_SCHEDULES) == {"constant", "oscillating", "linear"}
    steps = 10
    values = [guidance_schedule("oscillating", 12.0, low=1.0)(i, steps) for i in range(steps)]
    assert values == [12.0, 12.0, 12.0, 1.0, 12.0, 1.0, 12.0, 1.0, 12.0, 1.0]
    low = [guidance_schedule("oscillating", 8.0, low=2.0, warmup=0.5)(i, steps) for i in range(steps)]
    assert low == [8.0] * 5 + [8.0, 2.0, 8.0, 2.0, 8.0]
    assert [guidance_schedule("constant", 7.5)(i, steps) for i in (0, 9)] == [7.5, 7.5]
    ramp = [guidance_schedule("linear", 10.0)(i, steps) for i in range(steps)]
    assert ramp[0] == 1.0 and ramp[-1] == 10.0 and ramp == sorted(ramp)
    down = [guidance_schedule("linear", 10.0, increasing=False)(i, steps) for i in range(steps)]
    assert down == ramp[::-1]
    with pytest.raises(ValueError, match="oscillating"):
        guidance_schedule("oscilating", 7.5)
    with pytest.raises(ValueError, match="warmup"):
        guidance_schedule("oscillating", 7.5, warmup=3)


def test_threshold_x0():
    x0 = torch.cat([torch.linspace(-4, 4, 3 * 2 * 8).view(1, 3, 2, 2, 4), 0.1 * torch.ones(1, 3, 2, 2, 4)])
    torch.testing.assert_close(threshold_x0(x0, mode="clamp", value=2.0), x0.clamp(-2, 2))
    out = threshold_x0(x0, mode="percentile", value=0.9)
    s = torch.quantile(x0[0].abs().flatten(), 0.9)
    torch.testing.assert_close(out[0], x0[0].clamp(-s, s) / s)
    assert out[0].abs().max() == 1.0
    torch.testing.assert_close(out[1], x0[1])  # quantile within the bound of 1: unchanged
    torch.testing.assert_close(threshold_x0(x0, mode="percentile", value=0.9, bound=10.0), x0)
    wide = threshold_x0(x0, mode="percentile", value=0.9, bound=3.0)
    torch.testing.assert_close(wide[0], x0[0].clamp(-s, s) * 3 / s)
    assert wide[0].abs().max().item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="clamp"):
        threshold_x0(x0, mode="dynamic", value=0.9)


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_follow_the_base_config(name, prediction_type):
    base = base_scheduler(prediction_type)
    scheduler = make_scheduler(name, base.config)
    direct = DIRECT[name](**SD_BETAS, prediction_type=prediction_type)
    assert type(scheduler) is type(direct)
    assert scheduler.config.prediction_type == prediction_type
    torch.testing.assert_close(scheduler.alphas_cumprod, base.alphas_cumprod)
    scheduler.set_timesteps(25)
    direct.set_timesteps(25)
    torch.testing.assert_close(scheduler.timesteps, direct.timesteps)
    assert make_scheduler(name, base).config == scheduler.config  # the scheduler itself works too


def test_the_trailing_grid_starts_at_the_last_training_timestep():
    base = base_scheduler("epsilon")
    trailing, leading = make_scheduler("ddim_trailing", base.config), make_scheduler("ddim", base.config)
    trailing.set_timesteps(4)
    leading.set_timesteps(4)
    assert trailing.timesteps.tolist() == [999, 749, 499, 249]  # what a 4-step student is distilled on
    assert leading.timesteps.tolist() == [750, 500, 250, 0]  # the leading grid (SD adds 1): never above 750


def test_explicit_base_settings_carry_over():
    base = DDIMScheduler(**SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing")
    for name in SAMPLERS:
        assert make_scheduler(name, base.config).config.timestep_spacing == "trailing", name
    assert make_scheduler("dpmpp", base.config).config.algorithm_type == "dpmsolver++"


def test_unknown_sampler_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'euler_a'"):
        make_scheduler("euler-a", base_scheduler("epsilon").config)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_step_count_up_to_1000_samples_or_is_refused_before_any_model_call(name):
    sd = DDIMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False)  # as SD 1.5's
    scheduler = make_scheduler(name, sd.config)
    calls = []

    def model_fn(x_t, t, **cond):
        calls.append(float(t[0]))
        return torch.zeros_like(x_t)

    kwargs = dict(latents=torch.randn(1, 4, 1, 2, 2, generator=gen(0)), cond={}, generator=gen(1), progress=False)
    for steps in (998, 999, 1000):
        calls.clear()
        try:
            out = sample(model_fn, scheduler, num_inference_steps=steps, **kwargs)
        except ConfigError as exc:  # diffusers would index past the schedule or repeat a timestep: refused first
            assert not calls and f"{steps} steps do not fit {type(scheduler).__name__}" in str(exc)
            steps = int(str(exc).rsplit("use at most ", 1)[1])
            out = sample(model_fn, scheduler, num_inference_steps=steps, **kwargs)  # the most it names runs
        assert len(calls) == steps and 0 <= min(calls) and max(calls) < 1000 and torch.isfinite(out).all()
    if name == "ddim":  # the control: SD's leading grid puts 1000 DDIM steps at timestep 1000
        with pytest.raises(ConfigError, match="timesteps would reach 1000 .*; use at most 999"):
            sample(model_fn, scheduler, num_inference_steps=1000, **kwargs)


def oracle(scheduler, x0: torch.Tensor):
    """A model that predicts exactly what takes ``x_t`` back to ``x0`` (in the scheduler's prediction type)."""

    def model_fn(x_t, t, **cond):
        assert t.shape == (x_t.shape[0],)
        assert torch.equal(t, t.round()), "toy schedules only use whole timesteps"
        a = scheduler.alphas_cumprod[t.round().long()][:, None, None, None, None]
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if scheduler.config.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return model_fn


def clip(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target latents inside [-1, 1] (where clipping, if a sampler did it, would change nothing) and noise."""
    g = gen(seed)
    return 0.9 * torch.rand(2, 4, 3, 4, 4, generator=g) * 2 - 0.9, torch.randn(2, 4, 3, 4, 4, generator=g)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampling_an_oracle_recovers_x0(name, prediction_type):
    scheduler = make_scheduler(name, base_scheduler(prediction_type).config)
    x0, noise = clip(0)
    kwargs = dict(latents=noise, num_inference_steps=10, cond={}, generator=gen(1), progress=False)
    out = sample(oracle(scheduler, x0), scheduler, **kwargs)
    torch.testing.assert_close(out, x0, rtol=0, atol=2e-4)
    assert torch.equal(sample(oracle(scheduler, x0), scheduler, **{**kwargs, "generator": gen(1)}), out)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_threshold_acts_on_the_predicted_x0(name, prediction_type):
    scheduler = make_scheduler(name, base_scheduler(prediction_type).config)
    x0, noise = clip(0)
    kwargs = dict(latents=noise, num_inference_steps=10, cond={}, progress=False)
    loose = sample(oracle(scheduler, x0), scheduler, threshold=("clamp", 100.0), **kwargs)
    torch.testing.assert_close(loose, x0, rtol=0, atol=2e-4)
    tight = sample(oracle(scheduler, x0), scheduler, threshold=("clamp", 0.5), **kwargs)
    torch.testing.assert_close(tight, x0.clamp(-0.5, 0.5), rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", ["euler_a", "ddpm"])
def test_ancestral_samplers_depend_on_the_generator_only(name):
    scheduler = make_scheduler(name, base_scheduler("epsilon").config)
    _, noise = clip(0)

    def model(x_t, t):
        return 0.5 * torch.tanh(x_t)

    def run(seed):
        return sample(
            model, scheduler, latents=noise, num_inference_steps=8, cond={}, generator=gen(seed), progress=False
        )

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_sample_with_guidance_uses_one_batched_call_per_step():
    scheduler = make_scheduler("dpmpp", base_scheduler("v_prediction").config)
    model = CountingModel()
    _, noise = clip(0)
    _, _, cond, uncond = guidance_inputs()
    schedule = guidance_schedule("oscillating", 4.0, low=1.0, warmup=0.5)
    out = sample(
        model,
        scheduler,
        latents=noise,
        num_inference_steps=6,
        cond=cond,
        uncond=uncond,
        guidance=schedule,
        progress=False,
    )
    assert model.batches == [4, 4, 4, 4, 2, 4]  # warmup 3 steps at w=4, then 1.0 (single pass), then 4 again
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="uncond"):
        sample(model, scheduler, latents=noise, num_inference_steps=2, cond=cond, guidance=schedule, progress=False)


def test_a_base_config_silent_on_clipping_gets_sds_values():
    """A config saved from an Euler scheduler has no ``clip_sample``: DDIM and DDPM then took their pixel-space
    defaults, clipping the predicted clean latents to [-1, 1] (a model predicting 2.5 everywhere sampled 1.0) and
    ending DDIM at alpha 1. A value the config states is kept (the control)."""
    euler = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1).config
    for name in ("ddim", "ddim_trailing", "ddpm"):
        scheduler = make_scheduler(name, euler)
        assert scheduler.config.clip_sample is False, name
    assert make_scheduler("ddim", euler).config.set_alpha_to_one is False
    stated = DDIMScheduler(**SD_BETAS, clip_sample=True, set_alpha_to_one=True).config
    assert make_scheduler("ddim", stated).config.clip_sample and make_scheduler("ddim", stated).config.set_alpha_to_one

    def clean_at(x_t, t):  # epsilon for a clean prediction of 2.5 everywhere
        a = make_scheduler("ddim", euler).alphas_cumprod[t.long()].view(-1, 1, 1, 1, 1)
        return (x_t - a.sqrt() * 2.5) / (1 - a).sqrt()

    _, noise = clip(0)
    out = sample(clean_at, make_scheduler("ddim", euler), latents=noise, num_inference_steps=10, cond={},
                 progress=False)  # fmt: skip
    assert out.min() > 2.2 and abs(out.mean().item() - 2.5) < 0.02  # 1.0 everywhere when clipped


def test_each_scheduler_is_built_once(monkeypatch):
    """make_scheduler built DDIM and DDPM twice where the base config is silent on clipping: once to see whether
    they take clip_sample, again with SD's value. Once now, with the same config; a scheduler that takes no
    clip_sample records none (from_config drops it)."""
    builds = []

    def counted(name, factory):
        return lambda config, **kwargs: builds.append(name) or factory(config, **kwargs)

    def plain(config):  # _use_default_values is listed in a set's order
        return {**config, "_use_default_values": set(config["_use_default_values"])}

    euler = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1).config
    expected = {name: factory(euler, **LATENT_DEFAULTS) for name, factory in SAMPLERS.items()}
    for name, factory in list(SAMPLERS.items()):
        monkeypatch.setitem(SAMPLERS, name, counted(name, factory))
    for name in SAMPLERS:
        scheduler = make_scheduler(name, euler)
        assert builds == [name], (name, builds)
        assert type(scheduler) is type(expected[name]) and plain(scheduler.config) == plain(expected[name].config), (
            name
        )
        builds.clear()
    assert "clip_sample" not in make_scheduler("euler", euler).config
