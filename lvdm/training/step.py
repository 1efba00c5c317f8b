"""One micro-batch's loss: latents (cached or encoded), caption dropout, the noise prior, the diffusion loss.

Every random draw of a micro-batch comes from one generator seeded by ``(seed, rank, micro-batch
number)``, never from global RNG state: a resumed run draws exactly what an uninterrupted one
would have, on any number of data-loader workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lvdm.diffusion import diffusion_loss, sample_noise
from lvdm.diffusion.loss import LossTerms
from lvdm.models.encoders import encode_text, encode_video, sample_latents


def step_generator(seed: int, rank: int, micro_batch: int) -> torch.Generator:
    """A CPU generator for one micro-batch, independent of every other (a hash of its coordinates)."""
    digest = hashlib.sha256(f"lvdm:{seed}:{rank}:{micro_batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class Frozen:
    """The frozen parts around the video UNet, and the empty caption's embedding (for caption dropout)."""

    vae: Any
    tokenizer: Any
    text_encoder: Any
    noise_scheduler: Any
    empty_text: torch.Tensor  # (1, n, d)
    digests: dict[str, str] = field(default_factory=dict)  # encoder weight hashes, for the latent cache check
    image_encoder: Any = None  # a models.encoders.ImageEncoder, for image conditioning
    low_res_scheduler: Any = None  # an x4 upscaler base's low-res noise schedule
    max_noise_level: int | None = None  # ... and its highest level
    _no_image: torch.Tensor | None = field(default=None, repr=False)

    def no_image_tokens(self) -> torch.Tensor:
        """The image encoder's tokens ``(1, n, d)`` of "no image" (its all-zero input), computed once."""
        if self._no_image is None:
            from lvdm.models.encoders import no_image_tokens

            self._no_image = no_image_tokens(self.image_encoder)
        return self._no_image

    @classmethod
    def from_base(cls, base: Any) -> Frozen:
        from diffusers import DDPMScheduler

        empty = encode_text(base.tokenizer, base.text_encoder, [""])
        return cls(
            base.vae, base.tokenizer, base.text_encoder, DDPMScheduler.from_config(base.scheduler.config), empty,
            low_res_scheduler=getattr(base, "low_res_scheduler", None),
            max_noise_level=getattr(base, "max_noise_level", None),
        )  # fmt: skip


def batch_latents_and_text(
    batch: dict[str, Any], frozen: Frozen, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents (b, c, f, h, w), text (b, n, d))`` for a video batch or a latent-cache batch."""
    if "latents" in batch:
        params, text = batch["latents"], batch["text"]
    else:
        params = encode_video(frozen.vae, batch["video"].to(device))
        text = encode_text(frozen.tokenizer, frozen.text_encoder, batch["caption"])
    latents = sample_latents(frozen.vae, params.to(device=device, dtype=torch.float32), generator)
    return latents, text.to(device=device, dtype=torch.float32)


BATCH_INPUTS = ("fps",)
"""Batch fields that are model inputs when the video model has a part taking them (``fps``: each clip's rate)."""


def batch_inputs(
    batch: dict[str, Any],
    accepted: Any,
    device: torch.device,
    *,
    frozen: Frozen | None = None,
    train: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The model inputs a batch gives the parts of a model taking ``accepted`` inputs, one per clip: the fields it
    carries (``fps``), and for image conditioning the CLIP tokens of each clip's conditioning frame
    (:func:`image_inputs`; in training, ``generator`` draws the frame and the dropout)."""
    out = {key: batch[key].to(device) for key in BATCH_INPUTS if key in accepted and key in batch}
    if "image_embeds" in accepted:
        out["image_embeds"] = image_inputs(batch, frozen, train, generator)
    return out


def image_inputs(
    batch: dict[str, Any], frozen: Frozen, train: Any, generator: torch.Generator | None, *, drop_all: bool = False
) -> torch.Tensor:
    """The CLIP tokens ``(b, n, d)`` of each clip's conditioning frame (``train.image_frame``: the first, or a random
    one drawn from ``generator``), encoded here or read from the latent cache (``image_tokens``); with ``generator``,
    each image is dropped with ``train.image_dropout`` (replaced by the tokens of the encoder's all-zero input,
    IP-Adapter's "no image"); ``drop_all`` drops every one (the image gain's baseline). Without a generator
    (validation) the first frame, never dropped."""
    from lvdm.models.encoders import frame_tokens

    cached = batch.get("image_tokens")  # b k n d: the tokens of the first frame (k = 1) or of every frame
    b, f = (cached if cached is not None else batch["video"]).shape[:2]
    index = torch.zeros(b, dtype=torch.long)
    keep = torch.ones(b, dtype=torch.bool)
    if generator is not None:
        if train.image_frame == "random":
            index = torch.randint(0, f, (b,), generator=generator)
        keep = torch.rand(b, generator=generator) >= train.image_dropout
    none = frozen.no_image_tokens()  # 1 n d
    if drop_all or not keep.any():
        return none.expand(b, -1, -1).clone()
    if cached is not None:
        chosen = cached[torch.arange(b), index].float()
    else:
        chosen = frame_tokens(frozen.image_encoder, batch["video"][torch.arange(b), index])
    # b -> b 1 1: dropped images become "no image"
    return torch.where(keep[:, None, None].to(chosen.device), chosen, none.to(chosen.device))


def training_loss(
    model_fn: Any,
    batch: dict[str, Any],
    frozen: Frozen,
    train: Any,
    generator: torch.Generator,
    device: torch.device,
    *,
    conditioning: Callable[[torch.Tensor], dict[str, Any]] | None = None,
    inputs: dict[str, Any] | None = None,
) -> LossTerms:
    """The per-sample diffusion loss of one micro-batch under the ``train`` config's noise and dropout settings.

    ``conditioning(latents)``: more model inputs made from the clean latents (the context frames of a task), called
    after the noise is drawn; ``inputs``: model inputs read from the batch (:func:`batch_inputs`)."""
    latents, text = batch_latents_and_text(batch, frozen, generator, device)
    b = latents.shape[0]
    drop = (torch.rand(b, generator=generator) < train.caption_dropout).to(device)
    # b -> b 1 1: an empty caption where dropped
    text = torch.where(drop[:, None, None], frozen.empty_text.to(device, text.dtype).expand_as(text), text)
    noise = sample_noise(
        tuple(latents.shape),
        prior=train.noise_prior,
        mixed_lambda=train.mixed_noise_lambda,
        offset_noise=train.offset_noise,
        generator=generator,
        device=device,
    )
    extra = dict(inputs or {}) | (conditioning(latents) if conditioning is not None else {})
    return diffusion_loss(
        model_fn,
        latents,
        frozen.noise_scheduler,
        noise=noise,
        generator=generator,
        snr_gamma=train.snr_gamma,
        encoder_hidden_states=text,
        image_only_indicator=batch["is_image"].to(device),
        **extra,
    )
