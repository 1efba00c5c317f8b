"""Video super-resolution by 4: SD's x4 latent upscaler, with a temporal module or frame by frame.

The x4 upscaler (``stabilityai/stable-diffusion-x4-upscaler``, a ``StableDiffusionUpscalePipeline`` folder) denoises
latents as large as the low-res frames, with the low-res RGB concatenated to them and noised to ``noise_level`` by
its own low-res schedule (the level is the UNet's class label); its VAE decodes by 4. :class:`UpscalePipeline` runs
it on videos: with a temporal module trained on it (``train.target: upscale``) its temporal layers tie the frames
together, without one (or ``image_mode``) every frame is upscaled alone, as diffusers' pipeline would do it.

Large inputs run in **tiles**: the model over overlapping windows of ``tile`` low-res pixels (and of
``chunk_frames`` frames), their outputs cross-faded at every step (:func:`lvdm.tiles.tiled`), and the VAE over
overlapping latent tiles, cross-faded in pixels; both normalise every tile by the frame's GroupNorm statistics
(:mod:`lvdm.tile_norms`). A frame size the UNet cannot take (not a multiple of its downsampling) is padded by
reflection and the output cropped back.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvdm import __version__
from lvdm.errors import CheckpointError, ConfigError, check_flag, checked_keywords
from lvdm.models.family import downsampling
from lvdm.outputs import VideoOutput
from lvdm.sampling_settings import (
    DEFAULT_FPS,
    MAX_FPS,
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_FPS,
)
from lvdm.tile_decode import splits_its_decoder
from lvdm.upscale import DEFAULTS

MAX_NORM_PASSES = 8  # 4 reach the whole frame's statistics on the upscaler README "Tiles" measures


@dataclasses.dataclass(frozen=True)
class LowRes:
    """The video to upscale, as read."""

    frames: np.ndarray  # uint8 (f, h, w, 3)
    fps: float | None
    source: str


@dataclasses.dataclass(frozen=True)
class UpscaleLimits:
    """What an x4 upscaler allows an upscale's settings: its highest noise level, the multiple of low-res pixels its
    UNet's downsampling asks of a tile, and, where its VAE's decoder cannot run in tiles, that decoder's class."""

    max_noise_level: int
    multiple: int
    untileable_decoder: str | None = None

    @classmethod
    def of_folder(cls, folder: str | os.PathLike) -> UpscaleLimits:
        """Read from the folder's configs, before anything loads: ``sample.py --upscaler`` checks the upscale's
        settings before it samples. A VAE class (as ``model_index.json`` names it) other than diffusers'
        ``AutoencoderKL``, whose decoder is the GroupNorm ``Decoder``, is named as untileable; the call checks the
        loaded models again."""
        from lvdm.fileio import read_json

        def read(name: str) -> Any:
            try:
                return read_json(Path(folder) / name)
            except (OSError, ValueError) as error:
                raise CheckpointError(f"upscaler {folder}: cannot read {name} ({error})") from None

        index, unet = read("model_index.json"), read("unet/config.json")
        index = index if isinstance(index, dict) else {}
        levels = unet.get("block_out_channels") if isinstance(unet, dict) else None
        top = index.get("max_noise_level", 350)  # diffusers' default: 350
        vae = index.get("vae")  # [library, class]: the class diffusers loads
        if (not isinstance(levels, list) or not levels or isinstance(top, bool) or not isinstance(top, int)
                or not isinstance(vae, list) or len(vae) != 2):  # fmt: skip
            raise CheckpointError(f"upscaler {folder}: its model_index.json or unet/config.json is not a diffusers "
                                  "x4 upscaler's (max_noise_level, vae, block_out_channels)")  # fmt: skip
        kind = str(vae[1])
        return cls(top, downsampling(levels), None if kind == "AutoencoderKL" else kind)


class UpscalePipeline:
    """An x4 upscaler plus, optionally, a temporal module trained on it: low-res videos in, 4x videos out."""

    def __init__(self, base: Any, video: Any | None = None, *, sources: dict[str, Any] | None = None) -> None:
        if not getattr(base, "is_upscaler", False):
            raise ConfigError(
                f"{base.source} is not an x4 upscaler (a diffusers StableDiffusionUpscalePipeline folder such as "
                "stabilityai/stable-diffusion-x4-upscaler); lvdm.VideoPipeline samples text-to-image bases"
            )
        self.base, self.video, self.sources = base, video, dict(sources or {})
        for module in (base.unet, base.vae, base.text_encoder):
            module.eval().requires_grad_(False)
        if base.vae.dtype == torch.float16 and getattr(base.vae.config, "force_upcast", False):
            base.vae.float()  # the x4 VAE overflows in float16: diffusers' pipeline decodes in float32 too

    @classmethod
    @checked_keywords
    def from_pretrained(
        cls,
        upscaler: str | os.PathLike,
        *,
        temporal: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> UpscalePipeline:
        """Load the ``upscaler`` folder and the ``temporal`` module trained on it (``None``: frame by frame).

        A module made for another base (an SD text-to-image module) is refused with a
        :class:`~lvdm.errors.TemporalModuleError`, as is an upscaler module on an SD base by
        :class:`~lvdm.VideoPipeline`.
        """
        from lvdm.models import VideoUNet, load_base
        from lvdm.pipeline_loading import absolute, as_dtype, device_problem

        if device is not None and (problem := device_problem(device)):
            raise ConfigError(f"device {device}: {problem}")
        if not Path(upscaler).is_dir():
            raise CheckpointError(f"upscaler {upscaler} is not a folder (expected a diffusers x4 upscaler folder)")
        base = load_base(upscaler, allow_pickle=allow_pickle, dtype=as_dtype(dtype), device=device)
        pipe = cls(base, None, sources={"upscaler": absolute(upscaler), "temporal": absolute(temporal)})
        if temporal is not None:
            pipe.video = VideoUNet.from_temporal_file(base.unet, temporal).eval().requires_grad_(False)
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.base.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.unet.parameters()).dtype

    @property
    def multiple(self) -> int:
        """What the low-res height and width must divide by: the UNet's downsampling."""
        return downsampling(self.base.unet.config.block_out_channels)

    @property
    def limits(self) -> UpscaleLimits:
        """What this upscaler allows an upscale's settings (:func:`check_upscale_settings`)."""
        vae = self.base.vae
        refusal = None if splits_its_decoder(vae) else type(getattr(vae, "decoder", vae)).__name__
        return UpscaleLimits(self.base.max_noise_level, self.multiple, refusal)

    @property
    def scale(self) -> int:
        """Output pixels per low-res pixel: the VAE's factor (4)."""
        return downsampling(self.base.vae.config.block_out_channels)

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    @checked_keywords
    def __call__(
        self,
        video: Any,
        prompt: str = "",
        *,
        negative_prompt: str = "",
        noise_level: int = DEFAULTS["noise_level"],
        num_inference_steps: int = DEFAULTS["num_inference_steps"],
        guidance_scale: float = DEFAULTS["guidance_scale"],
        scheduler: str = "ddim",
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        tile: int | None = None,
        tile_overlap: int | None = None,
        chunk_frames: int | None = None,
        frame_norms: bool | str = True,
        norm_passes: int = 1,
        image_mode: bool = False,
        fps: float | None = None,
        progress: bool = True,
    ) -> VideoOutput:
        """Upscale ``video`` (a file, or uint8 frames ``(f, h, w, 3)``) by 4.

        Args:
            prompt, negative_prompt: what the video shows (the upscaler is text-conditioned) and what to avoid.
            noise_level: how much noise the low-res frames get before conditioning (0 .. the upscaler's
                ``max_noise_level``, 350): more lets it invent more detail and follow the input less.
            num_inference_steps, guidance_scale, scheduler, seed: as for :class:`~lvdm.VideoPipeline`.
            latents: the initial noise ``(1, 4, f, h, w)`` (the low-res size, after padding to a multiple of
                :attr:`multiple`) instead of drawing it.
            tile: run the model over ``tile`` x ``tile`` low-res pixel windows (a multiple of :attr:`multiple`)
                sharing ``tile_overlap`` pixels (default a quarter), and the VAE over the same latent tiles;
                ``None``: the whole frame at once.
            chunk_frames: the model over windows of this many frames (default: every frame at once), sharing a
                quarter of them.
            frame_norms: in tiles, every GroupNorm normalises by the frame's statistics, estimated by one more run
                on the frame subsampled to a tile's size (:mod:`lvdm.tile_norms`); ``"pooled"``: by all tiles' own
                statistics summed, gathered in a first pass over the tiles at every step (twice the model's work,
                closer to the whole frame); ``False``: by each tile's own, which makes tiles disagree.
            norm_passes: with ``frame_norms="pooled"``, the gathering passes at every step (1 .. 8), each
                normalised by the statistics the one before pooled: ``n`` cost ``n + 1`` times the model's work and
                come closer to the whole frame's statistics (README: "Tiles").
            image_mode: upscale every frame alone even with a temporal module (a one-frame video always is).
            fps: the output's frame rate (default: the file's, else 8).

        Returns:
            a :class:`~lvdm.outputs.VideoOutput` with uint8 frames ``(1, f, 4h, 4w, 3)`` at the input's rate.
        """
        from lvdm.diffusion import guidance_schedule, make_scheduler, sample
        from lvdm.tiles import tiled

        check_upscale_settings(self.limits, noise_level, num_inference_steps, tile, tile_overlap, chunk_frames)
        check_call(prompt, negative_prompt, scheduler, image_mode, fps)
        _check_norms(frame_norms, norm_passes, tile)
        check_seed_and_guidance(seed, guidance_scale)
        check_flag("progress", progress)
        low = read_low_res(video)  # after the checks: it decodes the whole video
        f, h, w = low.frames.shape[:3]
        seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        generator = torch.Generator().manual_seed(seed)
        noisy, level = self._noised_low_res(low.frames, noise_level, generator)
        noisy = pad_to_multiple(noisy, self.multiple)
        shape = (1, self.base.vae.config.latent_channels, f, *noisy.shape[3:])
        noise = self._initial_noise(shape, latents, generator)
        text = self._encode([prompt, negative_prompt])
        cond = {"encoder_hidden_states": text[:1], "low_res": noisy, "class_labels": level}
        by_frame = image_mode or self.video is None or f == 1
        model_fn = self.model_fn(image_mode=by_frame)
        if tile is not None or chunk_frames is not None:
            overlap = tile_overlap if tile_overlap is not None else (tile or 0) // 4
            model_fn = tiled(
                model_fn, (chunk_frames, tile, tile), (max(1, (chunk_frames or 0) // 4), overlap, overlap),
                norms=(self.base.unet if by_frame else self.video) if frame_norms else None, multiple=self.multiple,
                pooled=frame_norms == "pooled", passes=norm_passes,
            )  # fmt: skip
        clean = sample(
            model_fn, make_scheduler(scheduler, self.base.scheduler.config), latents=noise,
            num_inference_steps=num_inference_steps, cond=cond, uncond={"encoder_hidden_states": text[1:]},
            guidance=guidance_schedule("constant", guidance_scale), generator=[generator], progress=progress,
        )  # fmt: skip
        frames = self.decode(clean, tile=tile, tile_overlap=tile_overlap, frame_norms=frame_norms,
                             norm_passes=norm_passes)  # fmt: skip
        frames = frames[:, :, : h * self.scale, : w * self.scale]
        rate = float(fps or low.fps or DEFAULT_FPS)
        record = {
            "upscale": {
                "source": low.source, "low_res_size": [w, h], "noise_level": noise_level,
                "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "scheduler": scheduler,
                "tile": tile, "tile_overlap": tile_overlap, "chunk_frames": chunk_frames,
                "frame_norms": frame_norms if isinstance(frame_norms, str) else bool(frame_norms),
                "norm_passes": int(norm_passes),
            },
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "fps": rate,
            "mode": "image" if by_frame else "video", "model": self.sources,
            "initial_noise": "given" if latents is not None else "seed", "lvdm_version": __version__,
        }  # fmt: skip
        return VideoOutput(np.ascontiguousarray(frames), rate, [record], clean.cpu(), noise.cpu())

    def _noised_low_res(
        self, frames: np.ndarray, noise_level: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-res video ``(1, 3, f, h, w)`` in [-1, 1] noised to ``noise_level`` by the low-res schedule (each
        frame's noise drawn in turn from ``generator``, as diffusers draws one image's), and the level ``(1,)``."""
        pixels = torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]  # 1 3 f h w
        f, h, w = pixels.shape[2:]
        noise = torch.stack([torch.randn((1, 3, h, w), generator=generator) for _ in range(f)], dim=2)
        level = torch.tensor([noise_level], dtype=torch.long)
        noisy = self.base.low_res_scheduler.add_noise(pixels, noise, level)
        return noisy.to(self.device), level.to(self.device)

    def _initial_noise(
        self, shape: tuple[int, ...], latents: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        if latents is None:
            return torch.randn(shape, generator=generator).to(self.device)
        from lvdm.pipeline_sampling import check_noise

        check_noise("latents", latents)
        if tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} for this video, got {tuple(latents.shape)}")
        return latents.to(device=self.device, dtype=torch.float32)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        from lvdm.models.encoders import encode_text

        return encode_text(self.base.tokenizer, self.base.text_encoder, texts).to(self.device)

    def model_fn(self, *, image_mode: bool = False):
        """The denoiser as the sampling loop calls it: ``fn(x (b, 4, f, h, w), t, encoder_hidden_states, low_res
        (b, 3, f, h, w), class_labels (b,))``, the low-res frames concatenated to the latents."""
        from lvdm.models.video_unet import image_unet_on_frames

        dtype, video, unet = self.dtype, self.video, self.base.unet

        def fn(sample, t, encoder_hidden_states, class_labels):  # sample: latents and low-res frames, 7 channels
            sample, text = sample.to(dtype), encoder_hidden_states.to(dtype)
            if video is not None:  # its temporal layers sit inside the 2D UNet: bypassed by the flag, not skipped
                flags = torch.ones(sample.shape[0], device=sample.device) if image_mode else None
                return video(sample, t, text, class_labels=class_labels, image_only_indicator=flags).float()
            return image_unet_on_frames(unet, sample, t, text, class_labels=class_labels).float()

        return with_low_res(fn)

    @torch.no_grad()
    @checked_keywords
    def decode(
        self,
        latents: torch.Tensor,
        *,
        tile: int | None = None,
        tile_overlap: int | None = None,
        frame_norms: bool | str = True,
        norm_passes: int = 1,
    ) -> np.ndarray:
        """Latents ``(b, 4, f, h, w)`` -> uint8 frames ``(b, f, 4h, 4w, 3)``, frame by frame; where ``tile`` is
        given, the decoder's middle block (its attention spans the frame) on the whole frame and the rest over
        ``tile`` x ``tile`` latent windows sharing ``tile_overlap`` (default a quarter), normalised by each frame's
        statistics (``frame_norms``, :mod:`lvdm.tile_norms`; ``"pooled"``: the tiles' own, summed, in a second
        pass, ``norm_passes`` times) or each tile's own (:mod:`lvdm.tile_decode`)."""
        from lvdm.media import sampled_frames
        from lvdm.models.encoders import decode_latents
        from lvdm.pipeline_sampling import check_latents_to_decode
        from lvdm.tile_decode import decode_latents_tiled

        check_latents_to_decode(latents, self.base.vae.config.latent_channels)
        _check_tiles(self.limits, tile, tile_overlap)
        _check_norms(frame_norms, norm_passes, tile)
        if tile is None:
            video = decode_latents(self.base.vae, latents, chunk_frames=1)
        else:
            overlap = tile_overlap if tile_overlap is not None else tile // 4
            video = decode_latents_tiled(self.base.vae, latents, tile, overlap, frame_norms=frame_norms,
                                         passes=norm_passes)  # fmt: skip
        return sampled_frames(video)


# --------------------------------------------------------------------------------------------------- helpers
def check_call(prompt: Any, negative: Any, scheduler: Any, image_mode: Any, fps: Any) -> None:
    """The upscale's other arguments, as :class:`~lvdm.sampling_settings.SamplingSettings` checks the text-to-video
    pipeline's (a list of prompts would be taken as a prompt and its negative, a NaN fps found only when saving)."""
    from lvdm.diffusion.sampling import SAMPLERS

    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if not isinstance(text, str):
            raise ConfigError(f"{name} must be a string (the upscaler takes one video and one prompt), got {text!r}")
    if not isinstance(scheduler, str) or scheduler not in SAMPLERS:
        raise ConfigError(f"scheduler must be one of {', '.join(SAMPLERS)}, got {scheduler!r}")
    check_flag("image_mode", image_mode)
    real = isinstance(fps, numbers.Real) and not isinstance(fps, bool | np.bool_)
    if fps is not None and not (real and math.isfinite(fps) and MIN_FPS <= fps <= MAX_FPS):
        raise ConfigError(f"fps must be a number in {MIN_FPS} .. {MAX_FPS}, or None for the input's rate, got {fps!r}")


def check_upscale_settings(
    limits: UpscaleLimits, noise_level: Any, steps: Any, tile: Any, overlap: Any, chunk_frames: Any
) -> None:
    """Refuse settings an upscaler with these ``limits`` cannot take, with what is allowed."""
    top = limits.max_noise_level
    if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= top:
        raise ConfigError(f"noise_level must be an integer in 0 .. {top} (the upscaler's max), got {noise_level!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"num_inference_steps must be an integer in 1 .. {MAX_STEPS} (the timesteps), got {steps!r}")
    _check_tiles(limits, tile, overlap)
    if chunk_frames is not None and (isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int)
                                     or chunk_frames < 2):  # fmt: skip
        raise ConfigError(f"chunk_frames must be an integer >= 2, got {chunk_frames!r}")


def _check_tiles(limits: UpscaleLimits, tile: Any, overlap: Any) -> None:
    multiple = limits.multiple
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < multiple
                             or tile % multiple):  # fmt: skip
        raise ConfigError(f"tile must be a multiple of {multiple} low-res pixels (the UNet's), got {tile!r}")
    if overlap is not None and (tile is None or isinstance(overlap, bool) or not isinstance(overlap, int)
                                or not 0 <= overlap < tile):  # fmt: skip
        raise ConfigError(f"tile_overlap must be 0 .. tile - 1 and goes with tile, got {overlap!r}")
    if tile is not None and limits.untileable_decoder is not None:
        raise ConfigError(
            f"tile needs a VAE with diffusers' Decoder layout (its middle block runs whole, the rest in tiles), "
            f"not {limits.untileable_decoder}; upscale whole (tile=None)"
        )


def _check_norms(frame_norms: Any, passes: Any, tile: int | None) -> None:
    if not isinstance(frame_norms, bool | np.bool_) and frame_norms != "pooled":
        raise ConfigError(f"frame_norms must be True, False or 'pooled', got {frame_norms!r}")
    if isinstance(passes, bool) or not isinstance(passes, numbers.Integral) or not 1 <= passes <= MAX_NORM_PASSES:
        raise ConfigError(f"norm_passes must be an integer in 1 .. {MAX_NORM_PASSES}, got {passes!r}")
    if passes != 1 and frame_norms != "pooled":
        raise ConfigError(
            f"norm_passes={passes} goes with frame_norms='pooled' (the passes gather the tiles' "
            f"statistics), got frame_norms={frame_norms!r}"
        )
    if passes != 1 and tile is None:
        raise ConfigError(f"norm_passes={passes} goes with tile (the passes gather the tiles' statistics)")
    if tile is None and (frame_norms == "pooled" or not frame_norms):  # the whole frame has its own statistics
        raise ConfigError(f"frame_norms={frame_norms!r} goes with tile (it chooses the statistics of tiles)")


def check_seed_and_guidance(seed: Any, guidance: Any) -> None:
    """The ranges :class:`~lvdm.sampling_settings.SamplingSettings` holds the text-to-video pipeline's to."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ConfigError(f"seed must be an integer in 0 .. {MAX_SEED}, got {seed!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not abs(guidance) <= MAX_GUIDANCE:
        raise ConfigError(f"guidance_scale must be a number in -{MAX_GUIDANCE} .. {MAX_GUIDANCE}, got {guidance!r}")


def with_low_res(model_fn: Any) -> Any:
    """``model_fn`` taking the upscaler's inputs by name: ``fn(x, t, *, low_res (b, 3, f, h, w), class_labels (b,),
    ...)`` calls ``model_fn`` on ``[x, low_res]`` (channels) with the level as class label."""

    def fn(x: torch.Tensor, t: torch.Tensor, *, low_res: torch.Tensor, class_labels: torch.Tensor, **kw: Any):
        return model_fn(torch.cat([x, low_res.to(x.dtype)], dim=1), t, class_labels=class_labels, **kw)

    return fn


def read_low_res(source: Any) -> LowRes:
    """The frames of a video file (every frame, its own size) or of uint8 frames ``(f, h, w, 3)``."""
    from lvdm.context_sampling import frames_array, read_context

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        info = probe_low_res(path)
        read = read_context(path, info.height, info.width, what="video to upscale")
        return LowRes(read.frames, read.fps, str(path.absolute()))
    frames = frames_array(source, "frames to upscale", what="video to upscale")
    _check_size("frames to upscale", *frames.shape[:3])
    return LowRes(np.ascontiguousarray(frames), None, "frames")


def probe_low_res(path: str | os.PathLike) -> Any:
    """The header of a video file to upscale (:func:`lvdm.data.readers.probe`), checked before its frames are read:
    a file (a FIFO or folder is refused without opening it), a video, and not too large (:func:`_check_size`)."""
    from lvdm.data.readers import probe
    from lvdm.errors import LvdmError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"video to upscale {path} does not exist or is not a file")
    try:
        info = probe(path)
    except LvdmError as exc:
        raise ConfigError(f"video to upscale: {exc}") from exc  # the error names the file
    _check_size(str(path), info.num_frames, info.height, info.width)
    return info


def _check_size(what: str, frames: int, height: int, width: int) -> None:
    """The upscale of a video must fit what sampling allows (``MAX_SIDE`` pixels a side, ``MAX_FRAMES`` frames): a
    4000x4000 px input (16000 px out) filled 23 GB of memory before anything said so."""
    if max(height, width) * 4 > MAX_SIDE or frames > MAX_FRAMES:
        raise ConfigError(
            f"{what}: {frames} frames of {width}x{height} px would upscale to {4 * width}x{4 * height}; at most "
            f"{MAX_SIDE // 4} px a side ({MAX_SIDE} out) and {MAX_FRAMES} frames (cut or resize the video first)"
        )


def pad_to_multiple(video: torch.Tensor, multiple: int) -> torch.Tensor:
    """``(b, c, f, h, w)`` padded at the bottom and right by reflection (replication where a side is too short to
    reflect) up to multiples of ``multiple``."""
    h, w = video.shape[3:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not pad_h and not pad_w:
        return video
    frames = video.permute(0, 2, 1, 3, 4).flatten(0, 1)  # b c f h w -> (b f) c h w
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    frames = torch.nn.functional.pad(frames, (0, pad_w, 0, pad_h), mode=mode)
    return frames.reshape(video.shape[0], video.shape[2], *frames.shape[1:]).permute(0, 2, 1, 3, 4)
