"""Overlapping windows (lvdm.tiles): they cover the video, cross-fade to one, and a window-by-window model run
equals the whole run where the model is local, and wherever a position lies in one window only."""

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
    weights = cross_fade(8, 3, 2)
    assert weights.tolist() == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 2 / 3, 1 / 3])
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
