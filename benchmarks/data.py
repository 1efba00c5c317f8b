"""Section 4, data: clips per second of the dataset (``benchmarks.data_sampling``, called as is) and the training
step with cached latents against on-the-fly encoding.

The step is the trainer's own (:func:`lvdm.training.step.training_loss`: latents drawn from the VAE's Gaussian,
caption dropout, noise, diffusion loss) on the VideoUNet (default layout), plus backward and a fused AdamW step.
``cached`` starts from the latent cache's tensors (VAE parameters and text embeddings); ``on the fly`` from the
video ``(b, f, 3, H, W)`` and the captions, through the VAE encoder and the text encoder.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import Precision, Size, make_optimizer, threads_kept, time_round_robin
from benchmarks.models import MODELS, components, spatial_unet
from lvdm.models.family import downsampling

PROMPT = "a red panda eating bamboo in the snow"


def clips_per_second(size: Size) -> dict[str, Any]:
    """``benchmarks.data_sampling.run`` on its smoke or default setting; a failure there is reported, not raised."""
    try:
        from benchmarks import data_sampling

        setting = data_sampling.SMOKE if size.data_setting == "smoke" else data_sampling.Setting()
        with threads_kept():  # it measures single-threaded and sets torch's thread count for that
            return data_sampling.run(setting, show=False)
    except Exception:  # noqa: BLE001 - another module's failure must not stop the other sections
        return {"error": traceback.format_exc()}


def _frozen(size: Size, device: torch.device, precision: Precision) -> Any:
    from diffusers import DDPMScheduler

    from lvdm.models.encoders import encode_text
    from lvdm.training.step import Frozen

    parts = components(size.components)
    for key in ("vae", "text_encoder"):
        parts[key].to(device, precision.base_dtype).requires_grad_(False)
    empty = encode_text(parts["tokenizer"], parts["text_encoder"], [""])
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    return Frozen(parts["vae"], parts["tokenizer"], parts["text_encoder"], scheduler, empty)


def _batches(size: Size, frozen: Any, device: torch.device) -> dict[str, dict[str, Any]]:
    """The same clip as a video batch and as a latent-cache batch (encoded once here)."""
    from lvdm.models.encoders import encode_text, encode_video

    pixels = size.latent * downsampling(frozen.vae.config.block_out_channels)
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(size.batch, size.frames, 3, pixels, pixels, generator=gen) * 2 - 1  # (b, f, 3, H, W)
    captions = [PROMPT] * size.batch
    images = torch.zeros(size.batch, dtype=torch.bool)
    latents = encode_video(frozen.vae, video.to(device)).cpu()  # (b, 2c, f, h, w)
    text = encode_text(frozen.tokenizer, frozen.text_encoder, captions).cpu()
    return {
        "cached": {"latents": latents, "text": text, "is_image": images},
        "on the fly": {"video": video, "caption": captions, "is_image": images},
    }


def step_calls(size: Size, device: torch.device) -> dict[str, Callable[[], None]]:
    """A training step from each kind of batch, on one VideoUNet and optimizer."""
    from lvdm.config import TrainConfig
    from lvdm.training.step import training_loss

    precision = Precision.for_device(device)
    frozen = _frozen(size, device, precision)
    model = precision.apply(MODELS["lvdm"](spatial_unet(size.unet())), device)
    model.module.train()
    optimizer = make_optimizer(model.trainable())
    train = TrainConfig()

    def step(batch: dict[str, Any]) -> Callable[[], None]:
        def run() -> None:
            with precision.context(device.type):
                terms = training_loss(model.module, batch, frozen, train, torch.Generator().manual_seed(0), device)
            terms.loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    return {name: step(batch) for name, batch in _batches(size, frozen, device).items()}


def run(size: Size, device: torch.device, *, warmup: int, repeats: int) -> dict[str, Any]:
    """The section: clips/s, and the step from cached latents against on-the-fly encoding."""
    result: dict[str, Any] = {"clips": clips_per_second(size), "tables": [], "notes": []}
    clips = result["clips"]
    if "error" in clips:
        result["notes"].append("benchmarks.data_sampling failed (traceback in the JSON)")
    else:
        result["tables"].append({"title": "Clips per second (benchmarks.data_sampling)", "rows": _clip_rows(clips)})
    if size.needs_cuda and device.type != "cuda":
        result["notes"].append(f"step not timed: --size {size.name} trains only on a CUDA GPU; this run has none")
        return result
    timings = time_round_robin(step_calls(size, device), warmup=warmup, repeats=repeats, device=device)
    result["timing"] = {name: t.to_dict() for name, t in timings.items()}
    cached, fly = timings["cached"].median, timings["on the fly"].median
    result["tables"].append({
        "title": "Training step: cached latents against on-the-fly encoding (lvdm VideoUNet, default layout)",
        "rows": [{"batch": name, "median s": t.median, "spread": t.spread, "vs cached": t.median / cached}
                 for name, t in timings.items()],
    })  # fmt: skip
    result["notes"].append(f"encoding is {1 - cached / fly:.0%} of an on-the-fly step at this size")
    return result


def _clip_rows(clips: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in ("dataset", "full_decode", "decord"):
        if name in clips:
            figures = clips[name]
            rows.append({"method": name, "clips/s": figures["clips_per_s"], "seconds": figures["seconds"],
                         "vs full_decode": figures["speedup"]})  # fmt: skip
    if "dataset_vs_decord" in clips:
        rows.append({"method": "dataset / decord", "clips/s": clips["dataset_vs_decord"]})
    return rows
