"""What context frames cost: a training step with the context encoder, and rollout sampling per frame.

``python -m benchmarks --only context`` (any device). Two comparisons on the same inflated UNet, interleaved:

- **training step**: the plain video model vs the same model with the context encoder part (issue 11), fed a
  prediction task's mask (2 given frames) and context latents; forward, MSE loss, backward, AdamW step;
- **sampling per frame**: one clip of the training length ``T`` (text guidance: 2 passes per step) vs a rollout
  to ``3 T`` frames in chunks of at most ``T`` (:func:`lvdm.context_sampling.rollout_chunks`), each chunk after
  the first conditioned on the last 1 or 2 frames made, without and with context guidance (3 passes per step).
  Seconds per frame made; the denoising loop only (the VAE decode is per frame in both).
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness import Size, temporal_step, time_round_robin
from benchmarks.report import target


def _models(size: Size, device: torch.device) -> tuple[Any, Any]:
    from diffusers import UNet2DConditionModel

    from lvdm.models import VideoUNet
    from lvdm.models.parts import build_part

    torch.manual_seed(0)
    config = size.unet()
    plain = VideoUNet.from_unet2d(UNet2DConditionModel(**config)).freeze_base().to(device)
    context = VideoUNet.from_unet2d(UNet2DConditionModel(**config)).to(device)
    build_part(context, "context", "context", {})
    context.freeze_base()
    context.load_state_dict(plain.state_dict(), strict=False)  # the same weights, plus the zero-output encoder
    return plain, context


def _sampler(model: Any, size: Size, text: torch.Tensor, frames: int, context_frames: int, guidance: float):
    """A call making ``frames`` frames (one clip when ``frames`` is the training length, else a rollout)."""
    from lvdm.context_sampling import rollout_chunks
    from lvdm.diffusion import KnownFrames, guidance_schedule, make_scheduler, sample
    from lvdm.testing import tiny_scheduler

    scheduler = make_scheduler("ddim", tiny_scheduler("sd1").config)
    device = text.device
    empty = torch.zeros_like(text)
    h = w = size.latent

    from lvdm.modules.context_encoder import with_clean_context

    def call_model(x, t, encoder_hidden_states, **context):
        return model(x, t, encoder_hidden_states, **context)

    fn = with_clean_context(call_model)

    @torch.no_grad()
    def call() -> None:
        previous = None
        gen = torch.Generator().manual_seed(0)
        for known, new in rollout_chunks(frames, size.frames, 0, context_frames):
            noise = torch.randn(1, 4, known + new, h, w, generator=gen).to(device)
            cond, known_frames, free = {"encoder_hidden_states": text}, None, None
            if known:
                window = torch.zeros_like(noise)
                window[:, :, :known] = previous[:, :, -known:]
                mask = (torch.arange(known + new, device=device) < known)[None]
                cond |= {"context_latents": window, "context_mask": mask,
                         "context_flag": torch.zeros(1, dtype=torch.long, device=device)}  # fmt: skip
                known_frames = KnownFrames(window, mask, noise)
                free = {"context_mask": torch.zeros_like(mask)}
            out = sample(
                fn, scheduler, latents=noise, num_inference_steps=size.steps, cond=cond,
                uncond={"encoder_hidden_states": empty}, guidance=guidance_schedule("constant", size.guidance),
                known=known_frames, context_free=free, context_guidance=guidance if known else 1.0, progress=False,
            )  # fmt: skip
            previous = out if previous is None else torch.cat([previous, out[:, :, known:]], dim=2)

    return call


def run(size: Size, device: torch.device | None = None, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Training step with / without the context encoder, and sampling seconds per frame, rollout vs one clip."""
    from benchmarks.harness import video_inputs

    device = device or torch.device("cpu")
    plain, context = _models(size, device)
    text_dim = plain.unet.config.cross_attention_dim
    inputs = video_inputs(size, text_dim, device)
    b, f = inputs["x"].shape[0], inputs["x"].shape[2]
    mask = (torch.arange(f, device=device) < 2)[None].expand(b, f)
    extra = {"context_latents": inputs["x"], "context_mask": mask,
             "context_flag": torch.zeros(b, dtype=torch.long, device=device)}  # fmt: skip
    steps = {"plain": temporal_step(plain, inputs, dict), "context": temporal_step(context, inputs, lambda: extra)}
    timing = time_round_robin(steps, warmup=warmup, repeats=repeats, device=device)
    step_ratio = timing["context"].median / timing["plain"].median

    text = inputs["text"][:1]
    long = 3 * size.frames
    calls = {
        "one clip": (_sampler(context, size, text, size.frames, 1, 1.0), size.frames),
        "rollout, 1 given": (_sampler(context, size, text, long, 1, 1.0), long),
        "rollout, 2 given": (_sampler(context, size, text, long, 2, 1.0), long),
        "rollout, 1 given, context guidance": (_sampler(context, size, text, long, 1, 2.0), long),
    }
    sampled = time_round_robin({k: v[0] for k, v in calls.items()}, warmup=warmup, repeats=repeats, device=device)
    per_frame = {name: sampled[name].median / calls[name][1] for name in calls}
    rows = [{"model": name, "median s": t.median, "spread": t.spread} for name, t in timing.items()]
    sample_rows = [
        {"sampling": name, "frames": calls[name][1], "median s": sampled[name].median,
         "s / frame": per_frame[name], "vs one clip": per_frame[name] / per_frame["one clip"]}
        for name in calls
    ]  # fmt: skip
    ratio = {name: per_frame[name] / per_frame["one clip"] for name in calls}
    return {
        "timing": {name: t.to_dict() for name, t in {**timing, **sampled}.items()},
        "notes": [
            f"training: batch {b} x {f} frames, 2 given frames (a prediction task); the context encoder adds "
            f"{sum(p.numel() for p in context.parts.parameters()):,} parameters",
            f"sampling: {size.steps} DDIM steps, text guidance {size.guidance}; rollout to {long} frames in chunks "
            f"of at most {size.frames}: a chunk after the first remakes its given frames, so a long rollout costs "
            f"T / (T - given) per frame ({size.frames / (size.frames - 1):.3f} with 1 given, "
            f"{size.frames / (size.frames - 2):.3f} with 2) before the first chunk and the last, shorter one; "
            "context guidance adds a third pass to the batch",
        ],
        "tables": [
            {"title": "Training step with the context encoder", "rows": rows},
            {"title": "Sampling per frame: rollout vs one clip", "rows": sample_rows},
        ],
        "targets": [
            target("context training step / plain step", step_ratio, 1.10),
            target("rollout (1 given) seconds per frame / one clip's", ratio["rollout, 1 given"], 1.10),
            target("rollout (2 given) seconds per frame / one clip's", ratio["rollout, 2 given"], 1.10),
        ],
    }
