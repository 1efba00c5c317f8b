"""Overlapping windows (lvdm.tiles): they cover the video, cross-fade to one, and a window-by-window model run
equals the whole run where the model is local, and wherever a position lies in one window only; with the frame's
GroupNorm statistics recorded on a subsampled run, tiles normalise as the whole frame does."""

from __future__ import annotations

import pytest
import torch

from lvdm.tiles import cross_fade, span_weights, spans, tiled


def test_windows_cover_the_video_and_cross_fade_to_one():
    assert spans(10, 16, 4) == [(0, 10)]
    for frames in (17, 29, 64, 100):
        cuts = spans(frames, 16, 4)
        assert cuts[0][0] == 0 and cuts[-1][1] == frames and all(b - a == 16 for a, b in cuts)
        assert all(cuts[i][1] - cuts[i + 1][0] >= 4 for i in range(len(cuts) - 1))
        total, cover = torch.zeros(frames), torch.zeros(frames)
        for (begin, end), weight in zip(cuts, span_weights(cuts), strict=True):
            total[begin:end] += weight
            cover[begin:end] += 1
        assert (total > 0).all()  # every position has weight (the callers divide by the total)
        assert torch.allclose(total[cover <= 2], torch.ones(frames)[cover <= 2])  # two windows: the weights sum to 1
    weights = cross_fade(8, 3, 2)  # raised-cosine ramps: sin^2(pi/2 * i / 4) rising, cos^2(pi/2 * i / 3) falling
    assert weights.tolist() == pytest.approx([0.5 - 0.5**1.5, 0.5, 0.5 + 0.5**1.5, 1, 1, 1, 0.75, 0.25])
    assert (cross_fade(8, 0, 3)[-3:] + cross_fade(8, 3, 0)[:3]).tolist() == pytest.approx([1, 1, 1])
    with pytest.raises(ValueError, match="smaller than the window"):
        spans(20, 4, 4)


def test_a_local_model_run_in_tiles_equals_the_whole_run():
    """A position-wise model (a 1x1x1 conv reading per-position conditioning) gives the same output in any
    windows, and a window as large as the video is one call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 13, 11, generator=g)
    low = torch.randn(2, 3, 9, 13, 11, generator=g)
    weight = torch.randn(4, 7, generator=g)
    calls = []

    def fn(x, t, low_res, scale):
        calls.append(tuple(x.shape[2:]))
        return torch.einsum("oc,bcfhw->bofhw", weight, torch.cat([x, low_res], dim=1)) * scale

    whole = fn(x, None, low, 2.0)
    calls.clear()
    out = tiled(fn, (4, 6, 5), (1, 2, 2))(x, None, low_res=low, scale=2.0)
    assert torch.allclose(out, whole, atol=1e-5)
    assert max(calls) <= (4, 6, 5) and len(calls) > 8
    calls.clear()
    assert torch.equal(tiled(fn, (None, 20, 20), (0, 4, 4))(x, None, low_res=low, scale=2.0), whole)
    assert len(calls) == 1


def _normed_model() -> tuple[torch.nn.Module, object]:
    """Position-wise layers with two GroupNorms between them: tiles differ from the whole frame only through the
    statistics the norms see."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 1),
        torch.nn.GroupNorm(4, 8), torch.nn.Conv2d(8, 3, 1),
    )  # fmt: skip

    def fn(z):  # b c f h w, frames folded into the batch as a spatial model does
        b, c, f, h, w = z.shape
        return net(z.transpose(1, 2).reshape(b * f, c, h, w)).reshape(b, f, 3, h, w).transpose(1, 2)

    return net, fn


def test_tiles_normalise_by_the_frames_statistics():
    """A frame constant over 2x2 blocks, in 16-px tiles of 32: the reference run on every second row and column has
    exactly the frame's statistics, so the tiled run equals the whole one. Each tile by its own statistics does not
    (the control: the frame is brighter on one side, as frames are)."""
    from lvdm.tiles import tiled

    net, fn = _normed_model()
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(2, 4, 3, 16, 16, generator=g) + torch.linspace(-3, 3, 16)
    x = coarse.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # 32x32, constant on 2x2 blocks
    with torch.no_grad():
        whole = fn(x)
        shared = tiled(fn, (None, 16, 16), (0, 8, 8), norms=net)(x)
        own = tiled(fn, (None, 16, 16), (0, 8, 8))(x)
    assert torch.allclose(shared, whole, atol=1e-5), (shared - whole).abs().max()
    assert (own - whole).abs().mean() > 0.05
    assert all(type(m).forward is m.forward.__func__ for m in net.modules() if isinstance(m, torch.nn.GroupNorm))


def test_the_reference_run_is_no_larger_than_a_tile():
    from lvdm.tile_norms import subsampled

    assert subsampled((32, 32), (16, 16), 1) == (2, 16, 16)
    assert subsampled((100, 60), (32, 32), 8) == (4, 24, 8)  # 25x15 cropped to the UNet's multiples of 8
    assert subsampled((20, 20), (8, 8), 8) is None  # 7x7: nothing left to run


def test_pooled_statistics_reach_the_frames_own_over_successive_calls():
    """A frame the subsampled reference misjudges (noise at every pixel, brighter on one side). With ``pooled``,
    every call runs the tiles twice, the second pass normalised by all tiles' statistics from the first, summed
    with their cross-fade weights: a GroupNorm's statistics are exact once those of the layers before it were, so
    with two GroupNorms the second call equals the whole run. The controls: the reference run's estimate alone
    (calls without ``pooled``) stays off, and so do each tile's own statistics."""
    net, fn = _normed_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 32, 40, generator=g) * torch.linspace(0.5, 2, 40) + torch.linspace(-3, 3, 32)[:, None]
    with torch.no_grad():
        whole = fn(x)
        pooled = tiled(fn, (None, 16, 16), (0, 8, 8), norms=net, pooled=True)
        errors = [(pooled(x) - whole).abs().max().item() for _ in range(2)]
        reference = tiled(fn, (None, 16, 16), (0, 8, 8), norms=net)
        unpooled = [(reference(x) - whole).abs().max().item() for _ in range(2)]
        own = (tiled(fn, (None, 16, 16), (0, 8, 8))(x) - whole).abs().max().item()
    assert errors[1] < 1e-4 and errors[0] < 0.5 * unpooled[0], (errors, unpooled)
    assert min(unpooled) > 0.05 and own > 0.05, (unpooled, own)
    assert all(type(m).forward is m.forward.__func__ for m in net.modules() if isinstance(m, torch.nn.GroupNorm))


def test_pooled_statistics_need_no_reference_run():
    """A frame too thin to subsample to a tile's size (16 x 200 px in 16 px tiles, multiples of 8: the reference
    would be 2 rows, cropped to 0) had no shared statistics at all, pooled or not. Pooled, the first pass takes each
    tile's own and the next call is exact; the control: without pooling each tile keeps its own."""
    net, fn = _normed_model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 1, 16, 200, generator=g) + torch.linspace(-3, 3, 200)
    with torch.no_grad():
        whole = fn(x)
        pooled = tiled(fn, (None, 16, 16), (0, 8, 8), norms=net, multiple=8, pooled=True)
        errors = [(pooled(x) - whole).abs().max().item() for _ in range(2)]
        plain = (tiled(fn, (None, 16, 16), (0, 8, 8), norms=net, multiple=8)(x) - whole).abs().max().item()
    assert errors[1] < 1e-4 and plain > 0.05, (errors, plain)


def test_more_gathering_passes_reach_the_frames_statistics_in_one_call():
    """``passes``: each gathering pass is normalised by the statistics the one before pooled, so a layer's become
    exact a pass after those before it: with two GroupNorms, two passes make the first call equal the whole run.
    The control: one pass (the default) does not, in the first call."""
    net, fn = _normed_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 32, 40, generator=g) * torch.linspace(0.5, 2, 40) + torch.linspace(-3, 3, 32)[:, None]
    with torch.no_grad():
        whole = fn(x)
        error = {n: (tiled(fn, (None, 16, 16), (0, 8, 8), norms=net, pooled=True, passes=n)(x) - whole).abs().max()
                 for n in (1, 2)}  # fmt: skip
    assert error[2] < 1e-4 < 1e-2 < error[1], error


def test_the_vae_decodes_in_tiles_with_its_middle_block_on_the_whole_frame():
    """The decoder's middle block attends over every latent pixel of the frame, which no tile can: lvdm runs it
    whole and tiles the up blocks after it (lvdm.tile_decode). On the tests' x4 VAE, latents of 32x40 in tiles of
    16 sharing 4, mean |difference| per 255 from the whole decode: 8.6 (4.0 pooled) against 21.5 (18.3) with the
    whole decoder in tiles, the control; one tile as large as the frame is the whole decode."""
    from lvdm.models.encoders import decode_latents
    from lvdm.testing.upscaler import tiny_upscaler_vae
    from lvdm.tile_decode import decode_latents_tiled

    vae = tiny_upscaler_vae(0)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(1, 4, 2, 32, 40, generator=g) + torch.linspace(-1, 1, 40)) * vae.config.scaling_factor

    def whole_decoder(x):  # b c f h w -> b 3 f H W
        return decode_latents(vae, x, chunk_frames=1).permute(0, 2, 1, 3, 4)

    with torch.no_grad():
        whole = decode_latents(vae, z, chunk_frames=1)  # b f 3 H W
        assert torch.equal(decode_latents_tiled(vae, z, 40, 0), whole)
        for norms in (True, "pooled"):
            middle_whole = decode_latents_tiled(vae, z, 16, 4, frame_norms=norms)
            all_tiled = tiled(whole_decoder, (1, 16, 16), (0, 4, 4), scale=4, norms=vae, pooled=norms == "pooled")
            error, control = (
                (out - whole).abs().mean() * 127.5 for out in (middle_whole, all_tiled(z).transpose(1, 2))
            )
            assert error < 0.5 * control, (norms, error, control)
