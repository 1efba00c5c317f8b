"""VideoPipeline: text-to-video sampling with a temporal module on any SD base of its family (the Python API).

    pipe = VideoPipeline.from_pretrained("path/to/sd15", temporal="run/temporal.safetensors")
    out = pipe("a red panda eating bamboo", num_frames=16, seed=0)
    out.save("panda.mp4")        # and panda.mp4.json: prompt, seed and every setting, enough to reproduce it

Without ``temporal`` the same call renders in **image mode**: every frame is an independent image of the
prompt from its own noise (the base model alone), to compare against. ``image_mode=True`` does the same with
a temporal module loaded (its layers are bypassed exactly).

Everything numeric is reused: diffusers' schedulers (:data:`~lvdm.diffusion.SAMPLERS`, prediction type from
the base), lvdm's sampling loop with classifier-free guidance batched into one forward pass, guidance
schedules, guidance rescale, x0 thresholding and noise priors (:mod:`lvdm.diffusion`), frame-chunked VAE
decoding (:mod:`lvdm.models.encoders`) and the media writers (:mod:`lvdm.media`). What is written here is
the glue: settings (one typed, validated dataclass), seeds, batching, output files and their JSON sidecars.
The steps of one call (its settings resolved, its initial noise, the denoising loop) are in
:mod:`lvdm.pipeline_sampling`.

Seeds: video ``k`` of a call (prompt-major: prompt ``i``, copy ``j`` -> ``k = i * num_videos_per_prompt + j``)
draws its initial noise, and any sampler noise, from its own generator seeded ``seed + k``. So a video depends
on its own seed only, not on the batch it was drawn in, and its sidecar reproduces it alone:
``VideoPipeline.from_pretrained(**meta["model"])(meta["prompt"], **meta["settings"])``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvdm.errors import ConfigError, check_flag, checked_keywords
from lvdm.models.family import downsampling
from lvdm.outputs import FORMATS, VideoOutput, check_given_outputs, media_kind, plan_outputs, read_prompts
from lvdm.pipeline_loading import device_problem, refuse_upscaler
from lvdm.pipeline_sampling import (
    as_prompts,
    check_mixed_lambda,
    denoise,
    describe_base_noise,
    encode_prompts,
    initial_noise,
    latent_size,
    make_model_fn,
    negatives_for,
    random_seed,
    resolve_settings,
    take_rows,
    video_record,
)
from lvdm.sampling_settings import (
    DEFAULT_FPS,
    MAX_SEED,
    SETTING_NAMES,
    SamplingSettings,
    parse_threshold,
    sampling_settings,
    temporal_defaults,
)


# --------------------------------------------------------------------------------------------------- pipeline
class VideoPipeline:
    """An SD base (with its LoRAs fused) plus, optionally, a temporal module: text in, videos out.

    Build it with :meth:`from_pretrained`; call it with a prompt (or a list) and keyword
    :class:`SamplingSettings`; :meth:`render` writes a prompt list to files.
    """

    def __init__(
        self,
        base: Any,
        video: Any | None = None,
        *,
        sources: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        """``base``: a :class:`~lvdm.models.BaseModel`; ``video``: a VideoUNet on ``base.unet`` or ``None`` (image
        mode); ``sources``: the ``from_pretrained`` arguments recorded in sidecars; ``defaults``: as
        :func:`temporal_defaults` returns."""
        refuse_upscaler(base)
        self.base = base
        self.video = video
        self.sources = dict(sources or {})
        self.defaults = {key: value for key, value in (defaults or {}).items() if value is not None}
        self.image_part = video.parts["image"] if video is not None and "image" in video.parts else None
        self.image_encoder: Any = None  # a models.encoders.ImageEncoder (from_pretrained loads it)
        self.image_encoder_path: str | None = None
        self.decoder: Any = None  # a temporal VAE decoder (an AutoencoderKLTemporalDecoder); None: the base VAE's
        for module in (base.unet, base.vae, base.text_encoder):
            module.eval().requires_grad_(False)

    @classmethod
    @checked_keywords
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        *,
        temporal: str | os.PathLike | None = None,
        base_config: str | os.PathLike | None = None,
        loras: Sequence[Any] = (),
        spatial_weights: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        image_adapter: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
        decoder: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> VideoPipeline:
        """Load ``base`` (diffusers folder or single file) with ``loras`` fused, and the ``temporal`` module onto it.

        Args:
            base, base_config, loras, spatial_weights, allow_pickle: as :func:`~lvdm.models.load_base` takes them
                (``loras`` items ``"PATH[:SCALE]"``, ``(path, scale)`` or ``LoraSpec``, one of them alone, or a
                mapping of paths to scales).
            temporal: a temporal module file from training, or an AnimateDiff motion module (``.safetensors``,
                ``.ckpt`` with ``allow_pickle``, or a diffusers ``MotionAdapter`` folder); ``None`` samples in image
                mode. A module made for another base family is refused with a
                :class:`~lvdm.errors.TemporalModuleError`.
            image_adapter: an IP-Adapter Plus checkpoint (diffusers format) for ``image=``, with or without a temporal
                module (one trained with ``model.image_conditioning`` has its own image attention instead).
            image_encoder: the CLIP vision encoder folder the image attention reads (default: the one the module
                was trained with, when that folder exists here).
            decoder: a temporal VAE decoder folder (diffusers' ``AutoencoderKLTemporalDecoder``: one lvdm trained,
                or SVD's ``vae``) that decodes the videos instead of the base VAE's image decoder
                (:mod:`lvdm.models.temporal_vae`); one of another latent space is refused.
            device: where the models run (default: where they load, the CPU).
            dtype: ``torch.float16`` / ``"fp16"``, ``"bf16"``, ``"fp32"`` (default: fp32, whatever dtype the weight
                files hold).
        """
        from lvdm.pipeline_loading import load_parts

        parts = load_parts(
            base, temporal=temporal, base_config=base_config, loras=loras, spatial_weights=spatial_weights,
            allow_pickle=allow_pickle, image_adapter=image_adapter, image_encoder=image_encoder, decoder=decoder,
            device=device, dtype=dtype,
        )  # fmt: skip
        pipe = cls(parts.base, parts.video, sources=parts.sources, defaults=parts.defaults)
        image = parts.image
        pipe.image_part, pipe.image_encoder, pipe.image_encoder_path = image.part, image.encoder, image.encoder_path
        pipe.decoder = parts.decoder
        return pipe

    def compile(self) -> VideoPipeline:
        """Regional ``torch.compile`` of the UNet (:mod:`lvdm.models.compile`): the first call of each video size
        compiles, later ones run the compiled blocks. Frames equal eager sampling's within float tolerance."""
        from lvdm.models.compile import compile_blocks, spatial_blocks

        if self.video is not None:
            self.video.compile_blocks()
        else:
            compile_blocks(spatial_blocks(self.base.unet), self.device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.base.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent: 8 for SD's VAE (2 for the tiny test VAE)."""
        return downsampling(self.base.vae.config.block_out_channels)

    # ----------------------------------------------------------------------------------------------- sampling
    @checked_keywords(also=SETTING_NAMES)
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        latents: torch.Tensor | None = None,
        base_noise: torch.Tensor | int | None = None,
        context: Any = None,
        image: Any = None,
        progress: bool = True,
        **settings: Any,
    ) -> VideoOutput:
        """Sample videos for ``prompt`` (a string or a list).

        Args:
            prompt: the text; a list gives one video per prompt (times ``num_videos_per_prompt``).
            latents: initial noise ``(b, c, f, h', w')`` at unit variance, one per video, instead of drawing it;
                its frames and size are used where the settings leave them unset.
            base_noise: the mixed prior's shared base noise: an ``int`` seed (the same base for every video of
                the call) or a tensor ``(1 or b, c, 1, h', w')``. With it fixed, different seeds change only the
                per-frame residual: the same content, other motion.
            context: a video to continue (a file, or uint8 frames ``(f, h, w, 3)``), resized and centre-cropped to
                the sampling size like training clips; the result is ``num_frames`` new frames conditioned on its
                last ``context_frames``. Needs a module trained with context frames (:mod:`lvdm.context_sampling`).
                With such a module, ``num_frames`` beyond its training length rolls out chunk by chunk.
            image: a picture to animate (a file, a PIL image or uint8 ``(h, w, 3)``), any size or aspect: with a
                module trained with ``model.image_conditioning`` or an IP-Adapter given to :meth:`from_pretrained`
                (:mod:`lvdm.image_sampling`); ``image_scale`` and ``image_guidance_scale`` weigh it.
            progress: a progress bar over the denoising steps.
            **settings: :class:`SamplingSettings` fields (``negative_prompt``, ``num_frames``, ``height``, ``width``,
                ``num_inference_steps``, ``guidance_scale``, ``scheduler``, ``seed``, ``noise_prior``,
                ``context_frames``, ``context_guidance`` ...).

        Returns:
            a :class:`VideoOutput` with uint8 frames ``(b, f, h, w, 3)``.
        """
        from lvdm.context_sampling import context_latents, default_context_frames, is_rollout
        from lvdm.image_sampling import image_as_first_frame

        check_flag("progress", progress)
        prompts = as_prompts(prompt)
        s = resolve_settings(self, sampling_settings(**settings), latents)
        check_mixed_lambda(self, s, settings)
        n = len(prompts) * s.num_videos_per_prompt
        _check_seeds(s.seed, n)
        s, context = image_as_first_frame(self, s, image, context, explicit=settings)
        s = default_context_frames(self, s, explicit=settings)
        given = context_latents(self, s, context, explicit=settings)  # (latents, how they were read) or None
        rollout = is_rollout(self, s, given, latents, explicit=settings)
        negatives = negatives_for(s.negative_prompt, prompts)
        seeds = [s.seed + k for k in range(n)]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        shape = (n, self.base.vae.config.latent_channels, s.num_frames, *latent_size(self, s))
        noise = None if rollout else initial_noise(self, s, shape, latents, base_noise, generators)
        cond, uncond, image_record = self._conditions(prompts, negatives, s.num_videos_per_prompt, image)
        clean, noises, frames = self._sample_batches(s, cond, uncond, generators, noise, given, base_noise, progress)
        extra = _sidecar_extra(latents, base_noise, given, image_record)
        repeat = s.num_videos_per_prompt
        records = [
            video_record(self, s, prompts[k // repeat], negatives[k // repeat], seeds[k], extra) for k in range(n)
        ]
        return VideoOutput(frames, float(s.fps), records, clean, noises)

    def _conditions(
        self, prompts: list[str], negatives: list[str], repeat: int, image: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any] | None]:
        """The model inputs of the conditional and unconditional passes, one row per video (``repeat`` per prompt),
        and how ``image`` was read (``None`` without image conditioning)."""
        from lvdm.image_sampling import image_conditions

        # (p, n_tokens, d) -> (p * repeat, n_tokens, d): one text per video
        cond = {"encoder_hidden_states": encode_prompts(self, prompts).repeat_interleave(repeat, dim=0)}
        uncond = {"encoder_hidden_states": encode_prompts(self, negatives).repeat_interleave(repeat, dim=0)}
        if self.image_part is None:
            return cond, uncond, None
        # the encoder runs once for the whole call
        with_image, without, image_record = image_conditions(self, image, len(prompts) * repeat)
        return cond | with_image, uncond | without, image_record

    def _sample_batches(
        self,
        s: SamplingSettings,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        noise: torch.Tensor | None,
        given: tuple | None,
        base_noise: torch.Tensor | int | None,
        progress: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The videos denoised ``s.batch_size`` at a time (default: all together) and decoded: their clean latents,
        the noise they started from and their uint8 frames. ``noise``: each video's initial noise, or ``None`` for a
        rollout (each chunk draws its own), continuing the ``given`` video's latents ``(1, c, k, h', w')`` where
        there is one (:func:`~lvdm.context_sampling.context_latents`)."""
        from lvdm.context_sampling import rollout

        clean, frames, noises = [], [], []
        step = s.batch_size or len(generators)
        for start in range(0, len(generators), step):
            part = slice(start, start + step)
            inputs = take_rows(cond, part), take_rows(uncond, part)  # this batch's conditional, unconditional
            if noise is None:
                context_part = given[0].expand(len(generators[part]), -1, -1, -1, -1) if given is not None else None
                rows = _rows(base_noise, part, len(generators))
                done, drawn = rollout(self, s, *inputs, generators[part], context_part, rows, progress)
            else:
                drawn = noise[part]
                done = denoise(self, s, drawn, *inputs, generators[part], progress)
            clean.append(done.cpu())
            noises.append(drawn.cpu())
            frames.append(self.decode(done, chunk_frames=s.decode_chunk_size))
        return torch.cat(clean), torch.cat(noises), np.concatenate(frames)

    @checked_keywords(also=SETTING_NAMES)
    def interpolate(
        self,
        video: Any,
        *,
        factor: int = 4,
        prompt: str = "",
        progress: bool = True,
        **settings: Any,
    ) -> VideoOutput:
        """Raise the frame rate of ``video`` (a file, or uint8 frames ``(f, h, w, 3)``) by ``factor`` (4 or 16):
        its ``k`` frames become the keyframes of ``factor * (k - 1) + 1`` frames, unchanged, at ``factor`` times
        its fps. ``prompt`` (optional) describes it; ``settings`` as for ``__call__`` (size, steps, seed ...).
        Needs a module trained with ``interpolate`` among its tasks (:mod:`lvdm.context_sampling`)."""
        from lvdm.context_sampling import interpolate

        check_flag("progress", progress)
        return interpolate(self, video, factor=factor, prompt=prompt, progress=progress, **settings)

    # ----------------------------------------------------------------------------------------------- context
    @property
    def has_context(self) -> bool:
        """Whether the temporal module takes context frames (trained with ``model.context``)."""
        return self.video is not None and "context_mask" in self.video.conditioning_inputs

    @property
    def distilled(self) -> bool:
        """Whether the module is a distilled student (``train.target: distill``): the guidance weight is its input,
        and its own step count and sampler are the defaults."""
        return self.video is not None and "guidance_scale" in self.video.conditioning_inputs

    @property
    def has_fps(self) -> bool:
        """Whether the temporal module is conditioned on the frame rate (trained with ``model.fps_conditioning``):
        then the ``fps`` setting sets the motion speed, not only the playback rate."""
        return self.video is not None and "fps" in self.video.conditioning_inputs

    def chunk_length(self, s: SamplingSettings) -> int:
        """The most frames one model call takes in a rollout or an interpolation: the module's training length."""
        return int(self.defaults.get("num_frames") or s.num_frames)

    @checked_keywords(also=SETTING_NAMES)
    def render(
        self,
        prompts: str | Sequence[str],
        out: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        format: str | None = None,
        overwrite: bool = False,
        base_noise: torch.Tensor | int | None = None,
        context: Any = None,
        image: Any = None,
        progress: bool = True,
        **settings: Any,
    ) -> list[Path]:
        """Sample ``prompts`` and write each video (with its sidecar) as it is done; returns the media paths.

        ``out``: a file (``.mp4``/``.gif``, numbered when there are several videos), a folder (files named
        ``000-<prompt words>.<format>``, ``format`` mp4 by default), or one path per video as :func:`plan_outputs`
        returns them; a ``format`` given for files must be theirs (it named only a folder's). Prompts are
        sampled ``batch_size`` videos at a time (default 1 here; ``None``: all together), with the seeds one call
        for the whole list would use: video ``k`` gets ``seed + k``. ``base_noise``: a seed or a ``(1, c, 1, h', w')``
        tensor, ``context``: a video every prompt continues, and ``image``: a picture every prompt animates, as in
        :meth:`__call__`. An existing output is refused before sampling unless ``overwrite``.
        """
        prompts = as_prompts(prompts)
        s = sampling_settings(**{"batch_size": 1, **settings})
        check_flag("progress", progress)  # before the outputs are planned
        check_flag("overwrite", overwrite)
        repeat, kind = s.num_videos_per_prompt, "mp4" if format is None else format
        if isinstance(out, (str, os.PathLike)):
            paths = plan_outputs(out, prompts, num_videos_per_prompt=repeat, format=kind, overwrite=overwrite)
        else:
            paths = _output_list(out)
            check_given_outputs(paths, format=kind, overwrite=overwrite)
        if format is not None and (other := [path for path in paths if media_kind(path) != format]):
            raise ConfigError(f"format={format!r} and the output {other[0]} ({media_kind(other[0])}) disagree: format "
                              "names the files written into a folder; give a folder, or leave format out")  # fmt: skip
        if len(paths) != len(prompts) * repeat:
            raise ConfigError(f"got {len(paths)} output paths for {len(prompts) * repeat} videos")
        _check_gif_rate(paths, s.fps if s.fps is not None else self.defaults.get("fps", DEFAULT_FPS))
        seed = s.seed if s.seed is not None else random_seed()
        _check_seeds(seed, len(prompts) * repeat)
        negatives = negatives_for(s.negative_prompt, prompts)
        # batch_size=None (as sidecars record it): all at once, as in a call (None // repeat was a TypeError)
        per_call = len(prompts) if s.batch_size is None else max(1, s.batch_size // repeat)
        written = []
        for start in range(0, len(prompts), per_call):
            chunk = slice(start, start + per_call)
            # batch_size bounds the call's own batches too: a prompt's num_videos_per_prompt videos
            call = {**settings, "seed": seed + start * repeat, "negative_prompt": negatives[chunk],
                    "batch_size": s.batch_size}  # fmt: skip
            output = self(
                prompts[chunk], base_noise=base_noise, context=context, image=image, progress=progress, **call
            )
            written += [output.save(paths[start * repeat + j], index=j, overwrite=overwrite)[0]
                        for j in range(len(output))]  # fmt: skip
        return written

    # ----------------------------------------------------------------------------------------------- denoiser
    def model_fn(self, *, image_mode: bool = False) -> Callable[..., torch.Tensor]:
        """The denoiser as the sampling loop calls it:
        ``fn(x (b, c, f, h, w), t (b,), encoder_hidden_states, **inputs)``, ``inputs`` what the module's parts take
        (``fps``, ``image_embeds``, the context frames ...).

        Inputs are cast to the model's dtype, the output returned as float32. With no temporal module, or with
        ``image_mode``, every frame is denoised on its own by the image model.
        """
        return make_model_fn(self, image_mode=image_mode)

    @torch.no_grad()
    @checked_keywords
    def decode(self, latents: torch.Tensor, *, chunk_frames: int = 8) -> np.ndarray:
        """Latents ``(b, c, f, h, w)`` as the UNet makes them (the VAE's scaling not undone: what
        :attr:`VideoOutput.latents` holds) -> uint8 frames ``(b, f, h, w, 3)``.

        With a temporal decoder (``decoder=``), ``chunk_frames`` frames per decoder call, neighbouring calls
        sharing a quarter of them, cross-faded (:func:`~lvdm.models.temporal_vae.decode_video`); with the base VAE,
        each frame alone, ``chunk_frames`` per call.
        """
        from lvdm.media import sampled_frames
        from lvdm.models.encoders import decode_latents
        from lvdm.pipeline_sampling import check_latents_to_decode

        check_latents_to_decode(latents, self.base.vae.config.latent_channels)
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, numbers.Integral) or chunk_frames < 1:
            raise ConfigError(f"chunk_frames must be an integer >= 1, got {chunk_frames!r}")
        # more frames than there are decode in one call (torch's split overflowed past 2**63, after the sampling)
        chunk_frames = min(int(chunk_frames), latents.shape[0] * latents.shape[2])
        if self.decoder is not None:
            from lvdm.models.temporal_vae import decode_video

            config = self.base.vae.config
            video = decode_video(
                self.decoder, latents, scaling_factor=config.scaling_factor,
                shift_factor=getattr(config, "shift_factor", None) or 0.0,
                chunk_frames=max(chunk_frames, 2), overlap=max(1, chunk_frames // 4),
            )  # fmt: skip
        else:
            video = decode_latents(self.base.vae, latents, chunk_frames=chunk_frames)  # (b, f, 3, h, w) in [-1, 1]
        return sampled_frames(video)


__all__ = [
    "FORMATS",
    "SamplingSettings",
    "VideoOutput",
    "VideoPipeline",
    "device_problem",
    "media_kind",
    "parse_threshold",
    "plan_outputs",
    "read_prompts",
    "sampling_settings",
    "temporal_defaults",
]


def _output_list(out: Any) -> list[Path]:
    """``render``'s one path per video, each checked before any sampling: a path (not bytes, ``None`` or a dict's
    keys), of a kind :func:`media_kind` knows, and no two the same (the second video would meet the first's file)."""
    if isinstance(out, (bytes, dict)) or not isinstance(out, Sequence):
        raise ConfigError(f"out must be a file or folder path, or a list of one per video, got {out!r}")
    paths: dict[str, Path] = {}  # by absolute path
    for item in out:
        if not isinstance(item, (str, os.PathLike)) or not isinstance(os.fspath(item), str) or not os.fspath(item):
            raise ConfigError(f"out: each output must be a file or folder path (str or os.PathLike), got {item!r}")
        media_kind(item)
        if (key := os.path.abspath(item)) in paths:
            raise ConfigError(f"out: {item} is given twice; give one output per video")
        paths[key] = Path(item)
    return list(paths.values())


def _sidecar_extra(
    latents: torch.Tensor | None, base_noise: torch.Tensor | int | None, given: tuple | None, image: dict | None
) -> dict[str, Any]:
    """What every sidecar of a call records beside its settings: where the initial and base noise came from, and
    the context video and the image it was conditioned on."""
    extra = {"initial_noise": "given" if latents is not None else "seed"}
    extra["base_noise"] = describe_base_noise(base_noise)
    if given is not None:
        extra["context"] = given[1]
    if image is not None:
        extra["image"] = image
    return extra


def _rows(base_noise: torch.Tensor | int | None, part: slice, videos: int) -> torch.Tensor | int | None:
    """A batch's rows of a base noise given one per video ``(videos, c, 1, h', w')``; a seed, one shared row or
    ``None`` as they are. A rollout's chunks draw for the batch: the whole tensor was refused with ``batch_size``."""
    if isinstance(base_noise, torch.Tensor) and base_noise.ndim == 5 and len(base_noise) == videos > 1:
        return base_noise[part]
    return base_noise


def _check_gif_rate(paths: list[Path], fps: float) -> None:
    """A GIF among ``paths`` that cannot play at ``fps``, refused before sampling (the writer refused it after)."""
    from lvdm.media import gif_rate_problem

    if any(media_kind(path) == "gif" for path in paths) and (problem := gif_rate_problem(fps)):
        raise ConfigError(f"fps={fps:g}: {problem}")


def _check_seeds(seed: int, videos: int) -> None:
    """Video k uses ``seed + k``, and its sidecar must replay it: the last one within ``MAX_SEED``."""
    if seed + videos - 1 > MAX_SEED:
        raise ConfigError(
            f"seed {seed}: the last of {videos} videos would use seed {seed + videos - 1}, past {MAX_SEED}"
        )
