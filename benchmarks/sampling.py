"""Section 3, sampling: lvdm against diffusers' AnimateDiffPipeline on the same spatial UNet, scheduler (SD's
DDIM), steps, guidance weight, frames and initial noise.

Timed, per video:

- ``lvdm loop``: :func:`lvdm.diffusion.sample` around the VideoUNet (default layout), what VideoPipeline runs
  between text encoding and decoding;
- ``VideoPipeline``: :class:`lvdm.pipeline.VideoPipeline` end to end (text, loop, VAE decode), if it imports;
- ``AnimateDiff loop``: ``AnimateDiffPipeline(..., output_type="latent")`` from given text embeddings;
- ``AnimateDiffPipeline``: end to end from the prompt to decoded frames;
- the references: one guided UNet forward of each model (batch ``2b``: CFG batched), the VAE decode and the text
  encoding of prompt and negative prompt.

The overhead of a pipeline is its time over ``steps x`` its UNet's guided forward (the decode and text encoding
taken out for the end-to-end pipelines). A forward hook counts the UNet calls and their batch during one loop of
each, to check that classifier-free guidance is one batched forward per step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import Size, time_round_robin
from benchmarks.models import MODELS, VideoModel, components, spatial_unet
from benchmarks.report import target
from lvdm.models.family import downsampling

PROMPT = "a red panda eating bamboo in the snow"


def _count_calls(module: torch.nn.Module, run: Callable[[], Any]) -> dict[str, Any]:
    """How many times ``module`` ran during ``run`` and with which batch sizes."""
    batches: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: batches.append(_batch(args, kwargs)),
                                              with_kwargs=True)  # fmt: skip
    try:
        run()
    finally:
        handle.remove()
    return {"calls": len(batches), "batch_sizes": sorted(set(batches))}


def _batch(args: tuple, kwargs: dict[str, Any]) -> int:
    sample = args[0] if args else kwargs["sample"]
    return int(sample.shape[0])


class Setup:
    """The two video models, the frozen parts and the inputs, all in one dtype on one device."""

    def __init__(self, size: Size, device: torch.device) -> None:
        self.size, self.device = size, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        parts = components(size.components)
        self.vae = parts["vae"].to(device, self.dtype)
        self.text_encoder = parts["text_encoder"].to(device, self.dtype)
        self.tokenizer, self.scheduler = parts["tokenizer"], parts["scheduler"]
        unet = spatial_unet(size.unet())
        self.lvdm: VideoModel = MODELS["lvdm"](copy.deepcopy(unet))
        self.motion: VideoModel = MODELS["motion"](unet)
        for model in (self.lvdm, self.motion):
            model.module.to(device, self.dtype).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        shape = (size.batch, 4, size.frames, size.latent, size.latent)
        self.noise = torch.randn(shape, generator=gen).to(device)
        self.cond = self.encode([PROMPT] * size.batch)
        self.uncond = self.encode([""] * size.batch)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        from lvdm.models.encoders import encode_text

        return encode_text(self.tokenizer, self.text_encoder, texts).to(self.device)

    def guided_forward(self, model: VideoModel) -> Callable[[], torch.Tensor]:
        """One UNet forward as a CFG step runs it: batch ``2b``, unconditional half first."""
        x = torch.cat([self.noise, self.noise]).to(self.dtype)
        t = torch.full((x.shape[0],), 500, device=self.device, dtype=torch.long)
        text = torch.cat([self.uncond, self.cond])

        @torch.no_grad()
        def forward() -> torch.Tensor:
            return model.forward(x, t, text)

        return forward

    @property
    def pixels(self) -> int:
        return self.size.latent * downsampling(self.vae.config.block_out_channels)


def lvdm_loop(setup: Setup) -> Callable[[], torch.Tensor]:
    """:func:`lvdm.diffusion.sample` with the VideoUNet, as VideoPipeline calls it."""
    from lvdm.diffusion import guidance_schedule, make_scheduler, sample

    video, dtype = setup.lvdm.module, setup.dtype

    def model_fn(x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return video(x.to(dtype), t, encoder_hidden_states.to(dtype)).float()

    def run() -> torch.Tensor:
        return sample(
            model_fn, make_scheduler("ddim", setup.scheduler.config), latents=setup.noise,
            num_inference_steps=setup.size.steps, cond={"encoder_hidden_states": setup.cond},
            uncond={"encoder_hidden_states": setup.uncond},
            guidance=guidance_schedule("constant", setup.size.guidance), progress=False,
        )  # fmt: skip

    return run


def animatediff(setup: Setup) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``(loop, end_to_end)`` calls of diffusers' AnimateDiffPipeline on the UNetMotionModel."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    pipe = AnimateDiffPipeline(
        vae=setup.vae, text_encoder=setup.text_encoder, tokenizer=setup.tokenizer, unet=setup.motion.module,
        motion_adapter=None, scheduler=DDIMScheduler.from_config(setup.scheduler.config),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    common = dict(
        num_frames=setup.size.frames, height=setup.pixels, width=setup.pixels, guidance_scale=setup.size.guidance,
        num_inference_steps=setup.size.steps, latents=setup.noise.to(setup.dtype),
    )  # fmt: skip

    def loop() -> Any:
        return pipe(prompt_embeds=setup.cond, negative_prompt_embeds=setup.uncond, output_type="latent", **common)

    def end_to_end() -> Any:
        return pipe(prompt=[PROMPT] * setup.size.batch, negative_prompt=[""] * setup.size.batch, output_type="np",
                    **common)  # fmt: skip

    return loop, end_to_end


def video_pipeline(setup: Setup) -> Callable[[], Any] | str:
    """lvdm's VideoPipeline end to end on the same VideoUNet, or why it is not timed."""
    try:
        from lvdm.models.loading import BaseModel
        from lvdm.pipeline import VideoPipeline
    except ImportError as exc:
        return f"lvdm.pipeline.VideoPipeline does not import: {exc}"
    video = setup.lvdm.module
    base = BaseModel(unet=video.unet, vae=setup.vae, text_encoder=setup.text_encoder, tokenizer=setup.tokenizer,
                     scheduler=setup.scheduler, source="benchmark")  # fmt: skip
    pipe = VideoPipeline(base, video)

    def run() -> Any:
        return pipe([PROMPT] * setup.size.batch, latents=setup.noise, num_inference_steps=setup.size.steps,
                    guidance_scale=setup.size.guidance, scheduler="ddim", seed=0, progress=False)  # fmt: skip

    return run


def _decode(setup: Setup) -> Callable[[], torch.Tensor]:
    from lvdm.models.encoders import decode_latents

    return lambda: decode_latents(setup.vae, setup.noise, chunk_frames=8)


def _calls(setup: Setup) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    loop, end_to_end = animatediff(setup)
    calls = {
        "lvdm:forward": setup.guided_forward(setup.lvdm),
        "motion:forward": setup.guided_forward(setup.motion),
        "lvdm:loop": lvdm_loop(setup),
        "motion:loop": loop,
        "motion:pipeline": end_to_end,
        "vae:decode": _decode(setup),
        "text:encode": lambda: (setup.encode([PROMPT] * setup.size.batch), setup.encode([""] * setup.size.batch)),
    }
    skipped = {}
    pipeline = video_pipeline(setup)
    if isinstance(pipeline, str):
        skipped["lvdm:pipeline"] = pipeline
    else:
        calls["lvdm:pipeline"] = pipeline
    return calls, skipped


def run(size: Size, device: torch.device, *, warmup: int, repeats: int) -> dict[str, Any]:
    """The section: seconds per video, overhead over the UNet forwards, and the CFG batching check."""
    if size.needs_cuda and device.type != "cuda":
        return {"notes": [f"not timed: --size {size.name} samples only on a CUDA GPU; this run has none"]}
    setup = Setup(size, device)
    calls, skipped = _calls(setup)
    cfg = {
        "lvdm": _count_calls(setup.lvdm.module, calls["lvdm:loop"]),
        "motion": _count_calls(setup.motion.module, calls["motion:loop"]),
    }
    timings = time_round_robin(calls, warmup=warmup, repeats=repeats, device=device)
    result: dict[str, Any] = {
        "dtype": str(setup.dtype).removeprefix("torch."),
        "steps": size.steps,
        "guidance": size.guidance,
        "timing": {key: t.to_dict() for key, t in timings.items()},
        "unet_calls": cfg,
        "skipped": skipped,
    }
    result["tables"], result["targets"] = _tables(result, size), _targets(result, size)
    result["notes"] = [f"{size.steps} DDIM steps, guidance {size.guidance:g}, {size.frames} frames, "
                       f"{setup.pixels}x{setup.pixels} px, batch {size.batch}, {result['dtype']}"]  # fmt: skip
    result["notes"] += [f"{key}: {why}" for key, why in skipped.items()]
    return result


# --------------------------------------------------------------------------------------------------- derived figures
ROWS = {  # key: (label, model whose forwards it needs, subtract decode and text encoding)
    "lvdm:loop": ("lvdm loop (lvdm.diffusion.sample + VideoUNet)", "lvdm", False),
    "lvdm:pipeline": ("lvdm VideoPipeline, prompt to frames", "lvdm", True),
    "motion:loop": ("AnimateDiffPipeline, embeddings to latents", "motion", False),
    "motion:pipeline": ("AnimateDiffPipeline, prompt to frames", "motion", True),
}


def _seconds(result: dict[str, Any], key: str) -> float | None:
    timing = result["timing"].get(key)
    return timing["median_s"] if timing else None


def overhead(result: dict[str, Any], key: str, size: Size) -> float | None:
    """Pipeline time (without decode and text encoding where it does them) over ``steps x`` guided forwards."""
    seconds = _seconds(result, key)
    if seconds is None:
        return None
    _, model, end_to_end = ROWS[key]
    if end_to_end:
        seconds -= _seconds(result, "vae:decode") + _seconds(result, "text:encode")
    return seconds / (size.steps * _seconds(result, f"{model}:forward"))


def _tables(result: dict[str, Any], size: Size) -> list[dict[str, Any]]:
    rows = []
    for key, (label, model, _) in ROWS.items():
        if key not in result["timing"]:
            continue
        calls = result["unet_calls"][model]
        rows.append({
            "pipeline": label, "s / video": _seconds(result, key) / size.batch,
            "spread": result["timing"][key]["spread"],
            f"{size.steps} x guided forward s": size.steps * _seconds(result, f"{model}:forward"),
            "overhead (x forwards)": overhead(result, key, size),
            "UNet calls / step": calls["calls"] / size.steps, "UNet batch": ", ".join(map(str, calls["batch_sizes"])),
        })  # fmt: skip
    refs = [{"reference": key, "median s": _seconds(result, key), "spread": result["timing"][key]["spread"]}
            for key in ("lvdm:forward", "motion:forward", "vae:decode", "text:encode")]  # fmt: skip
    return [{"title": "Seconds per video", "rows": rows}, {"title": "References (one call each)", "rows": refs}]


def _targets(result: dict[str, Any], size: Size) -> list[dict[str, Any]]:
    out = [target(f"{key} time / (steps x guided forward)", overhead(result, key, size), 1.05)
           for key in ("lvdm:loop", "lvdm:pipeline") if key in result["timing"]]  # fmt: skip
    calls = result["unet_calls"]["lvdm"]
    batched = calls["calls"] == size.steps and calls["batch_sizes"] == [2 * size.batch]
    out.append({"target": "CFG as one batched forward per step (lvdm)", "value": f"{calls['calls']} calls, batch "
                f"{calls['batch_sizes']} for {size.steps} steps", "limit": f"{size.steps} calls of batch "
                f"{2 * size.batch}", "met": batched})  # fmt: skip
    return out
