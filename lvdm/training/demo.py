"""The embedded demo's assets: synthetic captioned clips and a tiny SD base trained on them, made on first use.

``python train.py`` with no arguments trains ``configs/demo.yaml``'s temporal layers on these:

1. clips: 12 real H.264 mp4s of a coloured shape crossing a dark gradient, captioned ("a red disc moving left");
2. base: the tiny SD-shaped VAE and image UNet trained on every frame of the training clips (the held-out ones
   excluded), so that image mode draws the shapes (see :mod:`lvdm.testing.demo_base`). Cached: a second run
   reuses it unless the recipe or the clips changed (``demo_base.json`` holds the key);
3. then the trainer trains the temporal layers on the frozen base, as for any real base.

``configs/demo_i2v.yaml`` also needs an image encoder: a tiny CLIP vision encoder with random (seeded) weights,
written on first use. Random CLIP features are still a fixed projection of the picture's patches, so the image
attention has something to read; what it learns is measured by the image gain. It trains on the same clips captioned
by their motion only (``motion.jsonl`` in the clip folder: "a shape moving left"), so that the picture is what says
which shape, of which colour, where: with the full captions the text already says all but the start (image gain
1.002 after 600 steps, against 1.36 after 200 with motion-only captions).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lvdm.errors import LvdmError

DEMO_CLIPS = 12
DEMO_UPSCALER = "upscaler"  # the demo x4 upscaler's folder name, beside the demo base (configs/demo_upscale.yaml)
MOTION_CAPTIONS = "motion.jsonl"  # in the clip folder: the clips captioned by their motion only (demo_i2v.yaml)


def demo_clip_folder(data: Any) -> Path | None:
    """The demo clip folder a data config reads: ``data.root``, or the folder holding its ``motion.jsonl``."""
    if data.root is not None:
        return Path(data.root)
    if data.manifest is not None and Path(data.manifest).name == MOTION_CAPTIONS:
        return Path(data.manifest).parent
    return None


def prepare_demo(
    cfg: Any, *, wait_seconds: float = 900.0, recipe: Any = None, upscaler_recipe: Any = None
) -> list[str]:
    """Create the demo clips and base model where the config expects them, unless current; says what it made.

    ``recipe``: a :class:`~lvdm.testing.demo_base.DemoBaseRecipe` (the tests train a shorter one);
    ``upscaler_recipe``: a :class:`~lvdm.testing.demo_upscaler.DemoUpscalerRecipe`, for a config whose base is the
    demo upscaler (``outputs/demo/upscaler``, beside the demo base).

    Under a multi-process launcher only rank 0 writes; the other ranks wait for its ``.ready`` marker.
    """
    base, clips = Path(cfg.model.base), demo_clip_folder(cfg.data)
    ready = clips / ".ready"
    if os.environ.get("RANK", "0") != "0":
        deadline = time.monotonic() + wait_seconds
        while not ready.exists():
            if time.monotonic() > deadline:
                raise LvdmError(f"rank 0 did not finish writing the demo assets ({ready}) in {wait_seconds:.0f} s")
            time.sleep(0.5)
        return []
    made = _make_assets(cfg, base, clips, recipe, upscaler_recipe)
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.touch()
    return made


def _make_assets(cfg: Any, base: Path, clips: Path, recipe: Any = None, upscaler_recipe: Any = None) -> list[str]:
    from lvdm.testing.clips import write_captioned_folder

    made = []
    if not any(clips.rglob("*.mp4")):
        started = time.perf_counter()
        # lossless: lossy, libx264 decoded to other frames from run to run on a busy CPU, and the figures moved
        write_captioned_folder(clips, DEMO_CLIPS, num_frames=24, fps=24.0, size=(64, 48), seed=0, crf=0)
        made.append(
            f"{DEMO_CLIPS} captioned synthetic clips (moving shapes, H.264 mp4) in {clips} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    if not (clips / MOTION_CAPTIONS).exists():
        _write_motion_captions(clips)
        made.append(f"motion-only captions of the clips in {clips / MOTION_CAPTIONS}")
    if base.name == DEMO_UPSCALER:  # configs/demo_upscale.yaml: the upscaler is made from the demo base beside it
        made += _make_base(cfg, base.with_name("base"), recipe)
        made += _make_upscaler(cfg, base, base.with_name("base"), upscaler_recipe)
    else:
        made += _make_base(cfg, base, recipe)
    encoder = getattr(cfg.model, "image_encoder", None)
    if getattr(cfg.model, "image_conditioning", False) and encoder and not (Path(encoder) / "config.json").exists():
        from lvdm.testing.image_adapters import write_image_encoder

        write_image_encoder(encoder)  # configs/demo_i2v.yaml: a tiny CLIP vision encoder, random (seeded) weights
        made.append(f"a tiny CLIP image encoder (random weights, 32x32 images) in {encoder}")
    return made


def _write_motion_captions(clips: Path) -> None:
    """``motion.jsonl``: every clip of the folder captioned "a shape moving <its direction>"."""
    import json

    from lvdm.errors import LvdmError
    from lvdm.fileio import atomic_path

    rows = []
    for video in sorted(clips.glob("*.mp4")):
        try:
            words = video.with_suffix(".txt").read_text(encoding="utf-8").split()  # "a red disc moving left"
            reason = f"its caption {' '.join(words)!r} does not say how a shape moves"
        except (OSError, UnicodeDecodeError):
            words, reason = [], "it has no readable caption file"
        if len(words) < 2 or words[-2] != "moving":
            raise LvdmError(
                f"{clips} holds {video.name}, not one of the demo's clips ({reason}); the demo makes its own clips "
                "in an empty folder: move that folder's files away"
            )
        rows.append(json.dumps({"video": video.name, "caption": f"a shape moving {words[-1]}"}))
    with atomic_path(clips / MOTION_CAPTIONS) as temp:
        Path(temp).write_text("\n".join(rows) + "\n", encoding="utf-8")


def training_clips(cfg: Any) -> list[tuple[Path, str]]:
    """``(path, caption)`` of the demo clips the run trains on (the held-out ones left out), with the clip
    folder's own captions (the base is trained on those, whichever captions the run reads)."""
    from dataclasses import replace

    from lvdm.data.build import build_split

    data = replace(cfg.data, root=str(demo_clip_folder(cfg.data)), manifest=None)
    train, _, _ = build_split(data, seed=cfg.train.seed)
    return [(Path(entry.media_path()), entry.read_caption()) for entry in train.entries]


def _make_base(cfg: Any, base: Path, recipe: Any = None) -> list[str]:
    """Train the demo base on the training clips unless ``base`` already holds one made the same way."""
    from lvdm.testing.demo_base import DemoBaseRecipe, demo_base_is_current, make_demo_base, recipe_key

    recipe = recipe or DemoBaseRecipe()
    clips, resolution = training_clips(cfg), tuple(cfg.data.resolution)
    if demo_base_is_current(base, recipe_key(recipe, clips, resolution)):
        return []
    print(f"demo: training the tiny base (VAE, then image UNet) on the frames of {len(clips)} clips", flush=True)
    stats = make_demo_base(base, clips, resolution, recipe, log=lambda line: print(line, flush=True))
    return [
        f"tiny SD1-shaped base trained on the clips' frames in {base} (VAE {stats['vae_seconds']:.0f} s, "
        f"reconstruction error {stats['vae_error_255']:.1f}/255; UNet {stats['unet_seconds']:.0f} s)"
    ]


def _make_upscaler(cfg: Any, path: Path, base: Path, recipe: Any = None) -> list[str]:
    """Train the demo x4 upscaler from the demo ``base`` unless ``path`` already holds one made the same way."""
    from lvdm.testing.demo_upscaler import (
        DemoUpscalerRecipe,
        demo_upscaler_is_current,
        make_demo_upscaler,
        upscaler_key,
    )

    recipe = recipe or DemoUpscalerRecipe()
    if demo_upscaler_is_current(path, upscaler_key(recipe, base)):
        return []
    clips = training_clips(cfg)
    print(f"demo: training the tiny x4 upscaler (image UNet) on the frames of {len(clips)} clips", flush=True)
    stats = make_demo_upscaler(path, base, clips, tuple(cfg.data.resolution), recipe,
                               log=lambda line: print(line, flush=True))  # fmt: skip
    return [f"tiny x4 upscaler trained on the clips' frames in {path} ({stats['seconds']:.0f} s)"]


def demo_summary(result: Any, cfg: Any) -> list[str]:
    """What the demo must show, measured on its run: samples that move like the clips, an image mode that draws
    shapes, a motion gain above 1 (the aims are those ``tests/test_demo.py`` checks on a shorter run)."""
    import numpy as np
    from PIL import Image, ImageSequence

    from lvdm.testing.demo_base import shows_a_shape

    g, lines = result.gain or {}, []
    if "motion_gain" in g:  # the upscaler's low-res frames pin most of each frame down: its aim is lower
        aim = "1" if "upscale_flicker_gain" in g else "1.05"
        lines.append(f"demo check: motion gain {g['motion_gain']:.3f} (aim: above {aim})")
    for task in ("predict", "interpolate", "interpolate_fine"):
        if f"context_gain_{task}" in g:
            lines.append(f"demo check: context gain ({task}) {g[f'context_gain_{task}']:.3f} (aim: above 1)")
    if "stage_flag_gain" in g:  # the demo's keyframes show their spacing, so the flag adds nothing there (README)
        lines.append(f"demo figure: stage flag gain {g['stage_flag_gain']:.3f} (no aim: on the demo the keyframes' "
                     "spacing already tells the stages apart)")  # fmt: skip
    if "image_gain" in g:
        lines.append(f"demo check: image gain {g['image_gain']:.3f} (aim: above 1)")
    if "fps_gain" in g:
        lines.append(f"demo check: fps gain {g['fps_gain']:.3f} (aim: above 1)")
        prompts = sorted({caption for _, caption in training_clips(cfg)})  # every kind of clip once
        changes = speed_sweep(cfg.model.base, result.temporal_path, prompts, guidance=cfg.train.validation_guidance)
        shown = " / ".join(f"{change:.2f} at {rate:g}" for rate, change in changes.items())
        falling = all(a > b for a, b in zip(list(changes.values()), list(changes.values())[1:], strict=False))
        lines.append(
            f"demo check: samples of the {len(prompts)} training captions change per frame {shown} fps "
            f"({'falling' if falling else 'NOT falling'} as the rate rises; aim: falling)"
        )
    if "upscale_flicker_gain" in g:
        lines.append(
            f"demo check: upscale flicker gain {g['upscale_flicker_gain']:.3f} (aim: above 1), PSNR "
            f"{g['psnr_upscaled_video']:.2f} dB as a video vs {g['psnr_upscaled_image']:.2f} frame by frame"
        )
    if "samples_frame_change" in g and "clips_frame_change" in g:
        ratio = g["samples_frame_change"] / max(g["clips_frame_change"], 1e-9)
        lines.append(
            f"demo check: samples change {g['samples_frame_change']:.2f} per frame, {ratio:.2f}x the clips' "
            f"(aim: within 3x), correlation {g['samples_frame_correlation']:.3f} (aim: above 0.5)"
        )
    gifs = [p for p in result.samples if p.name.startswith("image_mode_") and p.suffix == ".gif"]
    frames = [np.asarray(f.convert("RGB")) for gif in gifs for f in ImageSequence.Iterator(Image.open(gif))]
    if frames:
        shown = sum(shows_a_shape(frame) for frame in frames)
        lines.append(
            f"demo check: image mode draws one shape on the grey background in {shown}/{len(frames)} frames "
            "(lvdm.testing.demo_base.shows_a_shape)"
        )
    return lines


SWEEP_RATES = (8.0, 12.0, 24.0)  # the demo_fps clips' rates: 24 fps sources at strides 3, 2 and 1


def speed_sweep(
    base: Any,
    temporal: Any,
    prompts: list[str],
    *,
    guidance: float = 4.0,
    rates: tuple[float, ...] = SWEEP_RATES,
    steps: int = 20,
) -> dict[float, float]:
    """Mean absolute change between consecutive frames (0-255) of ``prompts`` sampled by the ``temporal`` module at
    each of ``rates`` (``--fps``), the same seeds: a model that reads the rate moves further per frame at a lower
    rate (the same motion in fewer frames)."""
    from lvdm import VideoPipeline
    from lvdm.training.validation import frame_metrics

    pipe = VideoPipeline.from_pretrained(base, temporal=temporal)
    changes = {}
    for rate in rates:
        out = pipe(prompts, fps=rate, num_inference_steps=steps, guidance_scale=guidance, seed=0, progress=False)
        changes[rate] = frame_metrics(out.frames)["frame_change"]
    return changes
