"""VideoUNet: the inflation of a 2D UNet and the invariants the whole toolkit relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import frame_by_frame, projection_rows, randomize, video_inputs
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from lvdm import testing
from lvdm.errors import ConfigError
from lvdm.models import LAYOUTS, TemporalLayout, VideoUNet
from lvdm.modules import video_cross_attention
from lvdm.modules.video_cross_attention import VideoCrossAttnProcessor, cross_attentions


def test_init_equals_image_unet_frame_by_frame(unet_pair):
    unet, reference = unet_pair
    video = VideoUNet.from_unet2d(unet)
    sample, timestep, text = video_inputs(reference)
    with torch.no_grad():
        expected = frame_by_frame(reference, sample, timestep, text)
        out = video(sample, timestep, text)
    assert out.shape == sample.shape
    assert expected.abs().mean() > 1e-3  # the comparison is not between zeros
    assert (out - expected).abs().max() < 1e-5


def test_image_only_is_exactly_the_image_unet_whatever_the_temporal_weights(unet_pair):
    unet, reference = unet_pair
    video = VideoUNet.from_unet2d(unet)
    randomize(video.temporal_parameters())
    sample, timestep, text = video_inputs(reference)
    with torch.no_grad():
        expected = frame_by_frame(reference, sample, timestep, text)
        image_mode = video(sample, timestep, text, image_only_indicator=torch.ones(2, dtype=torch.bool))
        video_mode = video(sample, timestep, text)
    assert torch.equal(image_mode, expected)
    assert (video_mode - expected).abs().max() > 1e-3  # the random temporal weights do act in video mode


def test_mixed_batch_bypasses_only_the_image_samples(unet_pair):
    unet, reference = unet_pair
    video = VideoUNet.from_unet2d(unet)
    randomize(video.temporal_parameters())
    sample, timestep, text = video_inputs(reference)
    with torch.no_grad():
        expected = frame_by_frame(reference, sample, timestep, text)
        out = video(sample, timestep, text, image_only_indicator=torch.tensor([1.0, 0.0]))
    assert torch.equal(out[0], expected[0])
    assert not torch.allclose(out[1], expected[1], atol=1e-3)


def test_temporal_layers_mix_information_across_frames(unet_pair):
    unet, _ = unet_pair
    video = VideoUNet.from_unet2d(unet)
    randomize(video.temporal_parameters())
    sample, timestep, text = video_inputs(video.unet)
    changed = sample.clone()
    changed[:, :, 0] += 1.0  # only frame 0 differs
    with torch.no_grad():
        a, b = video(sample, timestep, text), video(changed, timestep, text)
        ia = video(sample, timestep, text, image_only_indicator=torch.ones(2))
        ib = video(changed, timestep, text, image_only_indicator=torch.ones(2))
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 1e-4  # later frames see frame 0 in video mode
    assert torch.equal(ia[:, :, 1:], ib[:, :, 1:])  # and never in image mode


def test_a_temporal_layer_after_every_resnet_and_every_transformer(unet_pair):
    unet, reference = unet_pair
    resnets = sum(isinstance(m, ResnetBlock2D) for m in reference.modules())
    transformers = sum(isinstance(m, Transformer2DModel) for m in reference.modules())
    video = VideoUNet.from_unet2d(unet)
    kinds = [site.kind for site in video.sites]
    assert kinds.count("conv") == resnets and kinds.count("attention") == transformers
    assert any(site.name.startswith("mid_block.attentions") for site in video.sites)
    assert any(site.name.startswith("mid_block.resnets") for site in video.sites)


def test_every_new_branch_starts_at_zero_output(unet_pair):
    unet, _ = unet_pair
    video = VideoUNet.from_unet2d(unet)
    for name, param in video.named_temporal_parameters():
        if ".temporal.proj_out." in name or ".temporal.conv2." in name:
            assert torch.count_nonzero(param) == 0, name


def test_attention_only_layout_matches_animatediff_placement(unet_pair):
    unet, _ = unet_pair
    video = VideoUNet.from_unet2d(unet, LAYOUTS["attention_only"])
    assert video.sites and {site.kind for site in video.sites} == {"attention"}
    full = VideoUNet.from_unet2d(testing.tiny_unet(video.family and "sd1"), LAYOUTS["videoldm"])
    assert {site.kind for site in full.sites} == {"attention", "conv"}


@pytest.mark.parametrize(
    "layout", [TemporalLayout(conv_kernel=(3, 3, 3)), TemporalLayout(attention_depth=2, attention_heads=2)]
)
def test_configured_layouts_keep_the_init_equivalence(layout):
    unet = testing.tiny_unet("sd1")
    reference = testing.tiny_unet("sd1")
    video = VideoUNet.from_unet2d(unet, layout)
    sample, timestep, text = video_inputs(reference)
    with torch.no_grad():
        assert (video(sample, timestep, text) - frame_by_frame(reference, sample, timestep, text)).abs().max() < 1e-5
    if layout.attention_heads:
        assert {site.heads for site in video.sites if site.kind == "attention"} == {2}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention": False, "conv": False}, "at least one kind"),
        ({"conv_kernel": (2, 1, 1)}, "odd"),
        ({"attention_depth": 0}, "attention_depth=0"),
    ],
)
def test_layout_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TemporalLayout(**kwargs)


def test_freeze_base_trains_only_the_temporal_layers(unet_pair):
    unet, _ = unet_pair
    video = VideoUNet.from_unet2d(unet).freeze_base()
    assert not any(p.requires_grad for p in video.base_parameters())
    assert all(p.requires_grad for p in video.temporal_parameters())
    sample, timestep, text = video_inputs(video.unet)
    video(sample, timestep, text).square().mean().backward()
    assert all(p.grad is None for p in video.base_parameters())
    assert all(p.grad is not None for p in video.temporal_parameters())
    assert "temporal parameters:" in video.parameter_summary()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        video = VideoUNet.from_unet2d(testing.tiny_unet("sd1")).freeze_base()
        randomize(video.temporal_parameters())
        video.enable_gradient_checkpointing(checkpointing)
        sample, timestep, text = video_inputs(video.unet)
        video(sample, timestep, text).square().mean().backward()
        grads.append([p.grad.clone() for p in video.temporal_parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_text_is_projected_once_per_video_with_the_per_frame_result(monkeypatch, checkpointing):
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1")).freeze_base()
    video.enable_gradient_checkpointing(checkpointing)
    randomize(video.temporal_parameters())
    sample, timestep, text = video_inputs(video.unet)  # 2 videos of 5 frames
    rows = projection_rows(attn.to_k for _, attn in cross_attentions(video.unet))
    runs = {}
    for name in ("once per video", "per frame"):
        if name == "per frame":  # the control: diffusers' own processor, the text projected for every frame
            monkeypatch.setattr(video_cross_attention, "frames_sharing_context", lambda *args: None)
        rows.clear()
        out = video(sample, timestep, text)
        out.square().mean().backward()  # with checkpointing the recomputation projects the text again
        runs[name] = (out.detach(), [p.grad.clone() for p in video.temporal_parameters()], sorted(set(rows)))
        video.zero_grad(set_to_none=True)
    assert runs["once per video"][2] == [2]
    assert runs["per frame"][2] == [10]
    torch.testing.assert_close(runs["once per video"][0], runs["per frame"][0], rtol=0, atol=1e-6)
    for shared, per_frame in zip(runs["once per video"][1], runs["per frame"][1], strict=True):
        torch.testing.assert_close(shared, per_frame, rtol=1e-5, atol=1e-7)


def test_per_frame_timesteps_equal_per_video_ones():
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    randomize(video.temporal_parameters())
    sample, timestep, text = video_inputs(video.unet)
    per_frame = timestep[:, None].expand(2, sample.shape[2])
    with torch.no_grad():
        assert torch.equal(video(sample, timestep, text), video(sample, per_frame, text))


def test_sdpa_is_the_default_attention_and_xformers_needs_installing():
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    processors = video.unet.attn_processors
    assert any(".temporal." in name for name in processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    assert all(isinstance(attn.processor, VideoCrossAttnProcessor) for _, attn in cross_attentions(video.unet))
    pytest.importorskip("xformers", reason="with xformers installed the switch would succeed") if False else None
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install"):  # one line from the CLI, not a traceback
            video.set_attention_backend("xformers")
    with pytest.raises(ValueError, match="sdpa"):
        video.set_attention_backend("flash")


@pytest.mark.usefixtures("one_thread")
def test_wrong_inputs_are_clear_errors():
    """Each mistake named before torch meets it: empty latents failed in a reshape or a convolution ("cannot reshape
    tensor of 0 elements", "Kernel size can't be greater than actual input size"), text of the wrong width or any
    input of the wrong dtype in a matmul ("mat1 and mat2 shapes cannot be multiplied"), a numpy array or a list as
    the latents or the text in torch's internals, and a NaN or infinite timestep came out as a NaN prediction."""
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    sample, timestep, text = video_inputs(video.unet, f=2)
    shape = r"latents \(b, c=4, f, h, w\) with b, f, h, w >= 1"
    width = r"text embeddings \(b=2, n, d=32\) with n >= 1, given once per video"
    for change, error, message in (
        (lambda s, t, e: (s[:, :, 0], t, e), ValueError, shape),
        (lambda s, t, e: (s[:, :, :0], t, e), ValueError, shape),  # no frames
        (lambda s, t, e: (s[..., :0, :], t, e), ValueError, shape),  # no rows
        (lambda s, t, e: (s[..., :0], t, e), ValueError, shape),
        (lambda s, t, e: (s.numpy(), t, e), TypeError, "latents as a torch.Tensor .* got a ndarray"),
        (lambda s, t, e: (s.tolist(), t, e), TypeError, "latents as a torch.Tensor .* got a list"),
        (lambda s, t, e: (s.long(), t, e), TypeError, "sample must be a floating-point tensor"),
        (
            lambda s, t, e: (s.double(), t, e),
            TypeError,
            "sample is torch.float64, the model's weights are torch.float32",
        ),
        (lambda s, t, e: (s, t, e[:1]), ValueError, width),
        (lambda s, t, e: (s, t, e[..., :16]), ValueError, width),  # another text encoder's width
        (lambda s, t, e: (s, t, e[:, :0]), ValueError, width),
        (lambda s, t, e: (s, t, e[0]), ValueError, width),
        (lambda s, t, e: (s, t, e.numpy()), TypeError, "encoder_hidden_states must be a torch.Tensor"),
        (lambda s, t, e: (s, t, e.double()), TypeError, "encoder_hidden_states is torch.float64"),
        (lambda s, t, e: (s, t[None].expand(3, 2), e), ValueError, "timestep must be a scalar"),
        (lambda s, t, e: (s, float("nan"), e), ValueError, r"timestep must be finite, got \[nan\]"),
        (lambda s, t, e: (s, torch.tensor([1.0, float("inf")]), e), ValueError, "timestep must be finite"),
        (lambda s, t, e: (s, np.array([1.0, np.nan]), e), ValueError, "timestep must be finite"),
        (lambda s, t, e: (s, None, e), TypeError, "timestep must be a real number or a tensor of them, got None"),
        (lambda s, t, e: (s, "10", e), TypeError, "timestep must be a real number"),
        (lambda s, t, e: (s, True, e), TypeError, "timestep must be a real number"),
    ):
        with pytest.raises(error, match=message):
            video(*change(sample, timestep, text))
    # the controls: timesteps as numbers, numpy and lists, and other floats where autocast casts them
    with torch.no_grad():
        expected = video(sample, timestep, text)
        for given in (timestep.tolist(), timestep.numpy(), timestep.double()):
            torch.testing.assert_close(video(sample, given, text), expected)
        assert torch.equal(video(sample, 10.0, text), video(sample, np.float32(10), text))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert video(sample.bfloat16(), timestep, text).dtype == torch.bfloat16


def _tiny_unet_with(**config):
    """The tiny SD1 UNet's config with ``config`` changed, built by diffusers (not ``from_config``, which keeps the
    defaults the tiny config left as they are)."""
    tiny = {key: value for key, value in testing.tiny_unet("sd1").config.items() if not key.startswith("_")}
    return UNet2DConditionModel(**tiny | config)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("config", "width"),
    [
        ({"cross_attention_dim": (32, 32)}, 32),  # one width per block
        ({"cross_attention_dim": (32, 48), "mid_block_type": None}, 32),  # 48 only where no block attends to text
        ({"encoder_hid_dim": 24, "encoder_hid_dim_type": "text_proj"}, 24),  # the text projected to 32 first
        ({"encoder_hid_dim": 24}, 24),  # diffusers' default type: the same projection
    ],
    ids=["per-block", "per-block-unused", "text-proj", "text-proj-default"],
)
def test_the_text_width_is_the_one_the_unet_takes(config, width):
    """The width was checked only where cross_attention_dim was one number and no encoder_hid_proj came first:
    per-block widths or a text projection let text of any width reach a matmul ("mat1 and mat2 shapes cannot be
    multiplied")."""
    video = VideoUNet.from_unet2d(_tiny_unet_with(**config))
    sample, timestep = torch.randn(2, 4, 2, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        assert video(sample, timestep, torch.randn(2, 7, width)).shape == sample.shape
        for wrong in {16, 32, 48} - {width}:
            with pytest.raises(
                ValueError, match=rf"text embeddings \(b=2, n, d={width}\) .* got shape \(2, 7, {wrong}\)"
            ):
                video(sample, timestep, torch.randn(2, 7, wrong))


def test_cross_attentions_of_different_widths_are_named():
    """No one text fits cross-attentions of two widths (diffusers failed in a matmul, whatever the text's width)."""
    video = VideoUNet.from_unet2d(_tiny_unet_with(cross_attention_dim=(32, 48)))  # 32 down and up, 48 in the mid block
    sample, timestep = torch.randn(2, 4, 2, 8, 8), torch.tensor([10, 500])
    for width in (32, 48):
        with pytest.raises(ValueError, match=r"different widths \[32, 48\] .* cross_attention_dim \(32, 48\)"):
            video(sample, timestep, torch.randn(2, 7, width))


@pytest.mark.usefixtures("one_thread")
def test_wrong_per_video_conditioning_is_a_clear_error():
    """class_labels and added_cond_kwargs are repeated for each frame: another batch failed in a broadcast ("The size
    of tensor a (4) must match the size of tensor b (2)") or, where the sizes fit, gave frames another video's ids; a
    number failed in an AttributeError, labels (b, 1) in a broadcast, float labels in nn.Embedding, and labels given
    to a UNet without a class embedding were ignored."""
    upscaler = VideoUNet.from_unet2d(testing.tiny_upscaler_unet())
    sample, timestep, text = video_inputs(upscaler.unet, f=2)
    labels = torch.tensor([3, 4])
    per_video = r"class_labels must be given once per video, shape \(b=2, \.\.\.\), got shape"
    for given, error, message in (
        (labels[:1], ValueError, per_video),
        (labels[0], ValueError, per_video),
        (torch.tensor([1, 2, 3, 4]), ValueError, per_video),  # one per frame
        (3, TypeError, "class_labels must be a torch.Tensor .* got a int"),
        (labels[:, None], ValueError, r"class_labels must be one per video, shape \(2,\), got shape \(2, 1\)"),
        (labels.float(), TypeError, "whole numbers .* table of 1000 class embeddings, got torch.float32"),
    ):
        with pytest.raises(error, match=message):
            upscaler(sample, timestep, text, class_labels=given)
    sd1 = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    sample, timestep, text = video_inputs(sd1.unet, f=2)
    with pytest.raises(TypeError, match="class_labels given to a UNet without a class embedding"):
        sd1(sample, timestep, text, class_labels=labels)
    sdxl_like = VideoUNet.from_unet2d(
        _tiny_unet_with(addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=16 + 6 * 8)
    )  # fmt: skip
    added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
    for key, given in (("time_ids", torch.randn(4, 3)), ("text_embeds", torch.randn(1, 16))):  # (4, 3) went through
        with pytest.raises(ValueError, match=rf"added_cond_kwargs\['{key}'\] must be given once per video"):
            sdxl_like(sample, timestep, text, added_cond_kwargs=added | {key: given})
    with torch.no_grad():  # the controls
        assert sdxl_like(sample, timestep, text, added_cond_kwargs=added).shape == sample.shape
        sample, timestep, text = video_inputs(upscaler.unet, f=2)
        assert upscaler(sample, timestep, text, class_labels=labels).shape == (2, 4, 2, 8, 8)
        assert upscaler(sample, timestep, text, class_labels=labels.int()).shape == (2, 4, 2, 8, 8)


def test_temporal_layers_outside_the_video_forward_say_so():
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    with pytest.raises(RuntimeError, match="outside VideoUNet.forward"):
        video.unet(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 7, 32))


def test_inflating_twice_is_refused():
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    with pytest.raises(ValueError, match="inflated before"):
        VideoUNet.from_unet2d(video.unet)


@pytest.mark.parametrize("kernel", [(3, 1, 1), (5, 1, 1), (3, 3, 3)])
def test_temporal_conv_block_computes_its_conv3d(kernel):
    from lvdm.modules.temporal_conv import TemporalConvBlock

    torch.manual_seed(0)
    block = TemporalConvBlock(16, 12, kernel_size=kernel, norm_groups=4)
    randomize(list(block.parameters()))
    x = torch.randn(2, 16, 6, 5, 3, requires_grad=True)  # (b, c, f, h, w), h != w
    temb = torch.randn(2, 6, 12)

    def reference(x):
        silu = torch.nn.functional.silu
        h = block.conv1(silu(block.norm1(x)))  # nn.Conv3d's own forward
        h = h + block.time_emb_proj(silu(temb)).permute(0, 2, 1)[..., None, None]
        return x + block.conv2(silu(block.norm2(h)))

    out = block(x, temb)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    expected = reference(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_each_thread_sees_its_own_frame_layout():
    """Two threads inside their own frame contexts at once (two pipelines sampling side by side) each read theirs;
    an inner context gives the outer one back, and outside any there is none."""
    import threading

    from lvdm.modules.frame_context import FrameContext, active_frames, frame_context

    def context(frames: int) -> FrameContext:
        return FrameContext(frames, torch.zeros(1, frames), torch.arange(frames, dtype=torch.float32)[None])

    both_inside, both_read, seen = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30), {}

    def read(frames: int) -> None:
        with frame_context(context(frames)):
            both_inside.wait()
            seen[frames] = active_frames().num_frames
            both_read.wait()  # neither leaves its context before both have read

    threads = [threading.Thread(target=read, args=(frames,)) for frames in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {2: 2, 3: 3}
    with frame_context(context(4)):
        with frame_context(context(5)):
            assert active_frames().num_frames == 5
        assert active_frames().num_frames == 4
    assert active_frames() is None
