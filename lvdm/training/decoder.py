"""``train.target: decoder``: Video LDM's temporal VAE decoder, trained on clips with the encoder frozen.

Each clip is encoded by the base's frozen VAE encoder (a latent drawn from its Gaussian, seeded like every draw of a
step) and decoded by the video decoder (:mod:`lvdm.models.temporal_vae`, diffusers' ``AutoencoderKLTemporalDecoder``
started as the image decoder); the loss is the L1 distance to the clip, plus ``train.perceptual_weight`` times the
frames' LPIPS distance (:mod:`lvdm.modules.perceptual`; the backbone's weights a file the user names), plus, from
``train.disc_start`` on, the adversarial loss of a 3D-conv patch discriminator (:mod:`lvdm.modules.discriminator`,
hinge), weighted by ``train.disc_weight`` and, with ``train.disc_adaptive``, VQGAN's gradient-ratio rule at the
decoder's last layer (against the L1 and perceptual terms together, as VQGAN weighs it).

The discriminator and its optimizer belong to the objective: they are stepped in :meth:`DecoderObjective.after_step`
on the micro-batches of the step just taken (the decoder's output detached; under several processes its gradients
averaged across them), saved in every checkpoint and restored on resume. Each network gets gradients only on its
own step: the discriminator's parameters do not require grad while the decoder's loss runs through it, and its own
step sees detached videos.

Validation decodes the held-out clips (the encoder's mean latents, plus ``train.decoder_latent_noise``) with the
image decoder and the video decoder and reports, side by side, per-frame PSNR and the **flicker error**: the mean
absolute difference (0-255) between the reconstruction's and the original's consecutive-frame differences, i.e. the
frame-to-frame change the decoder adds or removes. ``flicker_gain`` is the image decoder's flicker error over the
video decoder's (above 1: less flicker); ``temporal_flicker_gain`` is the same video decoder given each frame alone
over given the video: what its temporal layers contribute, measured on the same weights with the other frames
removed (a decoder trained as a whole also improves frame by frame, which the first figure counts and this one does
not). With the perceptual loss on, the LPIPS distance of both decoders is reported too.

With ``data.cache`` the latents come from the latent cache, which for this target also keeps each clip's pixels
(``python -m lvdm.cache`` with the decoder config).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lvdm.training.objectives import Objective
from lvdm.training.step import Frozen

if TYPE_CHECKING:
    from lvdm.training.validation import Rendered

TEMPORAL_NAMES = (".temporal_res_block.", ".time_mixer.", "decoder.time_conv_out.")


class DecoderModel(nn.Module):
    """What the trainer trains for the decoder target: a video decoder, with the interface the loop uses
    (trained parameters, a one-line summary, the export)."""

    export_name = "decoder"  # <output_dir>/decoder/: a diffusers AutoencoderKLTemporalDecoder folder

    def __init__(self, model: Any, layers: str = "temporal") -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, latents: torch.Tensor, *, num_frames: int) -> torch.Tensor:
        """Unscaled latents ``((b f), c, h, w)`` -> frames ``((b f), 3, H, W)``."""
        return self.model.decode(latents, num_frames=num_frames).sample

    def named_temporal_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trained parameters: the temporal layers, or (``layers="all"``) the whole decoder."""
        for name, param in self.model.named_parameters():
            if name.startswith("decoder.") and (self.layers == "all" or any(t in name for t in TEMPORAL_NAMES)):
                yield name, param

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_temporal_parameters():
            yield param

    def parameter_summary(self) -> str:
        trained = sum(p.numel() for p in self.temporal_parameters())
        decoder = sum(p.numel() for n, p in self.model.named_parameters() if n.startswith("decoder."))
        what = "the whole decoder" if self.layers == "all" else "the decoder's temporal layers"
        return f"decoder parameters trained: {trained:,} ({what}; {decoder:,} in the decoder, encoder frozen)"

    def save_temporal(self, path: str | Path, *, training_config: dict[str, Any] | None = None) -> None:
        from lvdm.models.temporal_vae import save_video_decoder

        save_video_decoder(self.model, path, training_config=training_config)


def build_decoder_model(cfg: Any, device: torch.device, dtype: torch.dtype) -> tuple[DecoderModel, Frozen, dict]:
    """The video decoder built from the base's VAE (identity at start), the frozen encoders, the trained parameters."""
    from lvdm.data.cache import encoder_digests
    from lvdm.models import load_base
    from lvdm.models.temporal_vae import video_decoder_from_vae

    m = cfg.model
    base = load_base(m.base, base_config=m.base_config, loras=m.loras, allow_pickle=m.allow_pickle)
    # hashed before any cast, as the cache command hashes them; the cache keeps the clips' pixels for this target
    digests = encoder_digests(base.vae, base.text_encoder) | {"frames": True} if cfg.data.cache else {}
    trainee = DecoderModel(video_decoder_from_vae(base.vae), cfg.train.decoder_layers)
    trainee.model.requires_grad_(False)
    trainable = dict(trainee.named_temporal_parameters())
    for param in trainable.values():
        param.requires_grad_(True)
    chosen = {id(p) for p in trainable.values()}
    trainee.to(device)
    for param in trainee.parameters():
        param.data = param.data.float() if id(param) in chosen else param.data.to(dtype)
    if m.gradient_checkpointing:
        trainee.model.enable_gradient_checkpointing()
    for module in (base.vae, base.text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    frozen = Frozen.from_base(base)
    frozen.digests = digests
    return trainee, frozen, trainable


class DecoderObjective(Objective):
    """L1 + adversarial (3D patch discriminator) loss of the video decoder; PSNR and flicker of both decoders on the
    held-out clips; see the module docstring."""

    name = "decoder"

    def __init__(self, cfg: Any, video: Any, frozen: Frozen, device: torch.device) -> None:
        from lvdm.modules.discriminator import PatchDiscriminator3D

        super().__init__(cfg, video, frozen, device)
        train = cfg.train
        width = video.model.config.block_out_channels[0]
        self.disc = PatchDiscriminator3D(channels=max(16, width // 2), levels=3).to(device)
        self.disc_optimizer = torch.optim.AdamW(
            self.disc.parameters(), lr=train.disc_lr or train.lr, betas=(0.5, 0.9), weight_decay=0.0
        )
        self.perceptual = None
        if train.perceptual_weight:
            from lvdm.modules.perceptual import load_perceptual

            self.perceptual = load_perceptual(
                train.perceptual_net, train.perceptual_backbone, allow_pickle=cfg.model.allow_pickle
            ).to(device)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (clips, decoded) of the step being taken
        self.steps = 0
        self.adv_weight: float | None = None
        self.disc_skipped = 0

    def _scaled_latents(self, batch: dict[str, Any], generator: torch.Generator | None) -> torch.Tensor:
        """A batch's clips as latents ``(b, c, f, h', w')`` scaled as the UNet makes them: a draw from the frozen
        encoder's Gaussian (from the latent cache, or encoded here; its mean without ``generator``), plus
        ``train.decoder_latent_noise``."""
        from lvdm.models.encoders import encode_video, sample_latents

        vae = self.frozen.vae
        if "latents" in batch:
            params = batch["latents"].to(self.device).float()
        else:
            params = encode_video(vae, batch["video"].to(self.device)).float()
        if generator is None:
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = (params.chunk(2, dim=1)[0] - shift) * vae.config.scaling_factor
        else:
            latents = sample_latents(vae, params, generator)
        if sigma := self.cfg.train.decoder_latent_noise:  # per-frame errors, as a video model's latents have
            draw = generator if generator is not None else torch.Generator().manual_seed(0)  # validation: fixed
            latents = latents + sigma * torch.randn(latents.shape, generator=draw).to(latents)
        return latents

    @property
    def disc_active(self) -> bool:
        return self.cfg.train.disc_weight > 0 and self.steps >= self.cfg.train.disc_start

    def loss(self, model_fn: Any, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        from lvdm.modules.discriminator import adaptive_weight, generator_loss

        train = self.cfg.train
        target = batch["video"].to(self.device).float()  # b f 3 h w in [-1, 1]
        b, f = target.shape[:2]
        vae = self.frozen.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = self._scaled_latents(batch, generator) / vae.config.scaling_factor + shift  # the decoder's input
        # b c f h w -> (b f) c h w
        frames = z.permute(0, 2, 1, 3, 4).reshape(b * f, *z.shape[1:2], *z.shape[3:])
        decoded = model_fn(frames, num_frames=f).float()
        decoded = decoded.reshape(b, f, *decoded.shape[1:])  # (b f) 3 H W -> b f 3 H W
        reconstruction = (decoded - target).abs().mean(dim=(1, 2, 3, 4))
        if self.perceptual is not None:  # b f 3 h w -> (b f) 3 h w, per clip the frames' mean
            distance = self.perceptual(decoded.flatten(0, 1), target.flatten(0, 1)).view(b, f).mean(dim=1)
            reconstruction = reconstruction + train.perceptual_weight * distance
        self.pending.append((target.detach(), decoded.detach()))
        if not self.disc_active:
            return reconstruction
        self.disc.requires_grad_(False)  # the decoder's step: no gradient reaches the discriminator
        try:
            adversarial = generator_loss(self.disc(_channels_first(decoded)))
        finally:
            self.disc.requires_grad_(True)
        weight = torch.tensor(train.disc_weight, device=self.device)
        if train.disc_adaptive:
            last = self.video.model.decoder.time_conv_out.weight  # trained whatever decoder_layers says
            weight = weight * adaptive_weight(reconstruction.mean(), adversarial.mean(), last)
        self.adv_weight = float(weight)
        return reconstruction + weight * adversarial

    def after_step(self, step: int) -> dict[str, float]:
        """The discriminator's step on the decoder's step just taken (its micro-batches, decoded videos detached)."""
        from lvdm.modules.discriminator import hinge_discriminator_loss

        was_active = self.disc_active
        self.steps = step
        pending = self.pending[-self.cfg.train.gradient_accumulation :]
        self.pending = []
        if not was_active or not pending:
            return {}
        real = torch.cat([clips for clips, _ in pending])
        fake = torch.cat([decoded for _, decoded in pending])
        loss = hinge_discriminator_loss(self.disc(_channels_first(real)), self.disc(_channels_first(fake))).mean()
        if not torch.isfinite(loss):
            self.disc_skipped += 1
            return {"disc_skipped": self.disc_skipped}
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_across_processes(self.disc.parameters())
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        if step % self.cfg.train.log_every and step != 1:
            return {}
        return {"disc_loss": float(loss.detach()), "adv_weight": self.adv_weight or 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {
            "discriminator": self.disc.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict(),
            "steps": torch.tensor(self.steps),
            "disc_skipped": torch.tensor(self.disc_skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"discriminator", "disc_optimizer", "steps"} - set(state)
        if missing:
            raise ValueError(f"the decoder objective's state lacks {sorted(missing)}")
        self.disc.load_state_dict(state["discriminator"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        for group in self.disc_optimizer.param_groups:  # this run's rate: a resume that changes it trains with it
            group["lr"] = self.cfg.train.disc_lr or self.cfg.train.lr
        self.steps = int(state["steps"])
        self.disc_skipped = int(state.get("disc_skipped", 0))

    # ------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def reconstructions(self, model_fn: Any, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The held-out clips and both decoders' reconstructions from the encoder's mean latents, ``(n, f, 3, h, w)``
        in [-1, 1]: ``clips``, ``image`` (the base VAE, frame by frame), ``video`` (the video decoder, in chunks),
        ``each_frame`` (the video decoder given one frame at a time: the same weights without the other frames)."""
        from lvdm.models.encoders import decode_latents
        from lvdm.models.temporal_vae import decode_video

        vae, out = self.frozen.vae, {"clips": [], "image": [], "video": [], "each_frame": []}
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        for batch in batches:
            if "video" not in batch:
                continue
            clips = batch["video"].to(self.device).float()
            scaled = self._scaled_latents(batch, None)
            out["clips"].append(clips.cpu())
            out["image"].append(decode_latents(vae, scaled).float().cpu())
            scale = {"scaling_factor": vae.config.scaling_factor, "shift_factor": shift}
            out["video"].append(decode_video(model_fn.model, scaled, **scale).float().cpu())
            alone = decode_video(model_fn.model, scaled, **scale, chunk_frames=1, overlap=0)
            out["each_frame"].append(alone.float().cpu())
        return {k: torch.cat(v) for k, v in out.items() if v}

    def evaluate(self, model_fn: Any, batches: list[dict[str, Any]]) -> dict[str, float] | None:
        rec = self.reconstructions(model_fn, batches)
        if not rec:
            return None
        figures = {}
        for name, key in (("image", "image_decoder"), ("video", "video_decoder"), ("each_frame", "each_frame")):
            figures[f"psnr_{key}"] = psnr(rec[name], rec["clips"])
            figures[f"flicker_{key}"] = flicker_error(rec[name], rec["clips"])
        if self.perceptual is not None:
            for name, key in (("image", "image_decoder"), ("video", "video_decoder")):
                figures[f"lpips_{key}"] = self.lpips_distance(rec[name], rec["clips"])
        video = max(figures["flicker_video_decoder"], 1e-12)
        figures["flicker_gain"] = figures["flicker_image_decoder"] / video
        figures["temporal_flicker_gain"] = figures["flicker_each_frame"] / video
        return figures

    @torch.no_grad()
    def lpips_distance(self, decoded: torch.Tensor, clips: torch.Tensor, chunk: int = 16) -> float:
        """Mean per-frame LPIPS distance of ``(n, f, 3, h, w)`` videos to the clips, ``chunk`` frames at a time."""
        frames, truth = decoded.flatten(0, 1), clips.flatten(0, 1)
        distances = [
            self.perceptual(frames[i : i + chunk].to(self.device), truth[i : i + chunk].to(self.device)).cpu()
            for i in range(0, len(frames), chunk)
        ]
        return float(torch.cat(distances).mean())

    def render(
        self, model_fn: Any, out_dir: Path, *, fps: float | None = None, batches: list[dict[str, Any]] | None = None
    ) -> Rendered:
        """Each held-out clip beside its two reconstructions: ``out_dir/<i>.mp4|gif`` (clip | image decoder | video
        decoder, left to right)."""
        from lvdm.media import to_uint8_frames
        from lvdm.training.validation import Rendered, write_videos

        rec = self.reconstructions(model_fn, batches or [])
        if not rec:
            return Rendered()
        # n f 3 h w, three side by side -> n f 3 h 3w
        strips = torch.cat([rec["clips"], rec["image"], rec["video"]], dim=-1)
        videos = np.stack([to_uint8_frames(clip) for clip in strips])
        files = write_videos(videos, out_dir, fps=fps)
        return Rendered(files=files, videos={"reconstructions": videos})


def _average_across_processes(params: Any) -> None:
    """Under several processes, every rank's discriminator gradients averaged (it is not wrapped by accelerate, and
    its copies must stay equal); nothing with one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= dist.get_world_size()


def _channels_first(video: torch.Tensor) -> torch.Tensor:
    """``(b, f, 3, h, w)`` -> ``(b, 3, f, h, w)``, as the 3D discriminator reads it."""
    return video.permute(0, 2, 1, 3, 4)


def psnr(decoded: torch.Tensor, clips: torch.Tensor) -> float:
    """Mean per-frame PSNR (dB) of ``(n, f, 3, h, w)`` videos in [-1, 1] against the clips (peak: the range)."""
    error = ((decoded - clips) / 2).pow(2).mean(dim=(2, 3, 4)).clamp_min(1e-10)  # n f, on a [0, 1] scale
    return float((-10 * torch.log10(error)).mean())


def flicker_error(decoded: torch.Tensor, clips: torch.Tensor) -> float:
    """Mean absolute difference (0-255) between the decoded videos' consecutive-frame differences and the clips'."""
    if decoded.shape[1] < 2:
        return math.nan
    change = decoded[:, 1:] - decoded[:, :-1]
    truth = clips[:, 1:] - clips[:, :-1]
    return float((change - truth).abs().mean() * 127.5)
