"""Flow and landmark heads (``models/flow.py``, ``models/landmarks.py``) on clips: the correlation against a loop
reference, shapes for both presets at sizes that are and are not powers of two and at two clip lengths, gradients
reaching every weight, per-clip independence (GroupNorm), Opacus per-sample gradients equal to per-clip ones (the
clip, not the frame or pair, is the batch item), a flow head learning a one-pixel shift and telling +1 from -1 px
with frame A fixed, and landmark outputs starting at the crop centre.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from models.config import FlowHeadConfig, preset
from models.flow import FlowHead, correlation, crop_like, pair_correlation
from models.landmarks import LandmarkHead

LITE = preset("lite")
MOL = preset("mol")
# The mol flow head's structure (three deep stages, transposed upsampling, 21x21 dilated correlation), narrower.
MOL_FLOW_SMALL = dataclasses.replace(
    MOL.flow, encoder=(8, 16, 16), redirect=8, fuse=16, deep=(16, 16, 32), decoder=(16, 16, 8, 8, 8, 8)
)
FLOW_CONFIGS = {
    "lite": (LITE.flow, 32),
    "mol": (MOL_FLOW_SMALL, 64),
    "mol-both": (dataclasses.replace(MOL_FLOW_SMALL, skip_both_frames=True), 64),
}


def shift_zero(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y, x] = x[..., y + dy, x + dx], zero where that leaves the map."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (abs(dx), abs(dx), abs(dy), abs(dy)))
    return padded[..., abs(dy) + dy : abs(dy) + dy + h, abs(dx) + dx : abs(dx) + dx + w]


def correlation_reference(a: torch.Tensor, b: torch.Tensor, patch: int, dilation: int) -> torch.Tensor:
    r = patch // 2
    channels = []
    for i in range(patch):
        for j in range(patch):
            shifted = shift_zero(b, (i - r) * dilation, (j - r) * dilation)
            channels.append((a * shifted).mean(dim=1))
    return F.leaky_relu(torch.stack(channels, dim=1), 0.1)


@pytest.mark.parametrize("patch", [3, 5])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_correlation_matches_loop_reference(patch: int, dilation: int, size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(patch * 10 + dilation)
    a = torch.randn(2, 4, *size, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 4, *size, generator=gen, dtype=torch.float64)
    out = correlation(a, b, patch, dilation)
    assert out.shape == (2, patch * patch, *size)
    torch.testing.assert_close(out, correlation_reference(a, b, patch, dilation), rtol=1e-12, atol=1e-12)


def test_pair_correlation_is_correlation_per_pair() -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(2, 4, 3, 5, 6, generator=gen, dtype=torch.float64)  # (B, C, pairs, h, w)
    b = torch.randn(2, 4, 3, 5, 6, generator=gen, dtype=torch.float64)
    out = pair_correlation(a, b, 3, 2)
    assert out.shape == (2, 9, 3, 5, 6)
    for clip in range(2):
        for pair in range(3):
            expected = correlation_reference(a[clip : clip + 1, :, pair], b[clip : clip + 1, :, pair], 3, 2)[0]
            torch.testing.assert_close(out[clip, :, pair], expected, rtol=1e-12, atol=1e-12)


def test_correlation_layout_and_padding() -> None:
    # b is a at a known displacement: the channel of that displacement equals mean(a^2) where it stays inside.
    a = torch.rand(1, 3, 7, 7, dtype=torch.float64)
    b = shift_zero(a, -1, 2)  # b[y, x] = a[y - 1, x + 2], so a[y, x] = b[y + 1, x - 2]
    out = correlation(a, b, patch=5, dilation=1)
    channel = (1 + 2) * 5 + (-2 + 2)  # i - r = 1, j - r = -2
    expected = (a * a).mean(dim=1)[0]
    torch.testing.assert_close(out[0, channel, :6, 2:], expected[:6, 2:])
    assert torch.all(out[0, channel, 6, :] == 0) and torch.all(out[0, channel, :, :2] == 0)


def test_correlation_rejects_even_patch() -> None:
    a = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="odd"):
        correlation(a, a, 4, 1)


def test_crop_like() -> None:
    assert crop_like(torch.zeros(1, 2, 10, 12), torch.zeros(3, 5, 9, 12)).shape == (1, 2, 9, 12)
    assert crop_like(torch.zeros(1, 2, 3, 10, 12), torch.zeros(1, 5, 3, 9, 11)).shape == (1, 2, 3, 9, 11)


def _flow_inputs(
    n: int, t: int, size: int, channels: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip batch: frames (n, 1, t, size, size) and pair features (n, channels, t - 1, size/8, size/8)."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.rand(n, 1, t, size, size, generator=gen, dtype=dtype),
        torch.randn(n, channels, t - 1, size // 8, size // 8, generator=gen, dtype=dtype),
    )


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize(
    "config,size",
    [
        (LITE.flow, 32),
        (LITE.flow, 40),
        (LITE.flow, 64),
        (MOL_FLOW_SMALL, 64),
        (MOL_FLOW_SMALL, 72),
        (FLOW_CONFIGS["mol-both"][0], 72),
    ],
    ids=["lite-32", "lite-40", "lite-64", "mol-64", "mol-72", "mol-both-72"],
)
def test_flow_head_shape(config, size: int, t: int) -> None:
    torch.manual_seed(0)
    head = FlowHead(config, 16)
    flow = head(*_flow_inputs(2, t, size, 16))
    assert flow.shape == (2, 2, t - 1, size, size)
    assert torch.isfinite(flow).all()


def test_mol_flow_head_has_release_structure() -> None:
    assert not MOL.flow.skip_both_frames and LITE.flow.skip_both_frames
    head = FlowHead(MOL.flow, 256, norm="batch")
    assert head.fuse[0].in_channels == 32 + 441 + 256 and head.fuse[0].out_channels == 256
    assert [stage[1][0].out_channels for stage in head.deep] == [512, 512, 1024]
    assert [p.in_channels for p in head.predict] == [1024, 1026, 770, 386, 258, 130, 35]
    assert [up.conv.in_channels for up in head.up_features] == [1024, 1026, 770, 386, 258, 130]
    # lite stops at 1/4, as FlowNetC does: one decoder stage whose skip holds both frames' 1/4 maps (2x32)
    lite = FlowHead(LITE.flow, 256)
    assert [p.in_channels for p in lite.predict] == [96, 64 + 48 + 2]
    parametrised = [m for m in lite.modules() if any(True for _ in m.parameters(recurse=False))]
    assert all(isinstance(m, nn.Conv3d | nn.GroupNorm) for m in parametrised)


def test_a_coarse_flow_is_its_last_prediction_upsampled_bilinearly_in_full_resolution_pixels() -> None:
    torch.manual_seed(0)
    head = FlowHead(LITE.flow, 16)
    frames, features = _flow_inputs(2, 3, 32, 16)
    coarse = []
    head.predict[-1].register_forward_hook(lambda module, args, out: coarse.append(out))
    flow = head(frames, features)
    assert coarse[0].shape == (2, 2, 2, 8, 8)  # 1/4 of 32
    folded = coarse[0].transpose(1, 2).flatten(0, 1)
    expected = F.interpolate(folded, scale_factor=4.0, mode="bilinear", align_corners=False)
    assert torch.allclose(flow, expected.unflatten(0, (2, 2)).transpose(1, 2))  # no rescaling of the values


@pytest.mark.parametrize(("decoder", "stride"), [((48, 32), 4), ((48,), 1), ((48,), 3)])
def test_flow_decoder_must_reach_the_output_stride(decoder: tuple[int, ...], stride: int) -> None:
    with pytest.raises(ValueError, match="flow"):
        FlowHeadConfig(decoder=decoder, output_stride=stride)


def test_flow_head_rejects_bad_inputs() -> None:
    head = FlowHead(LITE.flow, 16)
    frames, features = _flow_inputs(1, 3, 32, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        head(frames[..., :30, :30], features)
    with pytest.raises(ValueError, match="1/8"):
        head(frames, features[..., :3, :3])
    with pytest.raises(ValueError, match="T-1"):
        head(frames, features[:, :, :1])
    with pytest.raises(ValueError, match="T >= 2"):
        head(frames[:, :, :1], features[:, :, :0])
    with pytest.raises(ValueError, match="grey clips"):
        head(frames[:, :, 0], features)


@pytest.mark.parametrize("name", ["lite", "mol"])
def test_flow_head_gradients_reach_every_parameter_frame_b_and_features(name: str) -> None:
    config, size = FLOW_CONFIGS[name]
    torch.manual_seed(1)
    head = FlowHead(config, 16)
    frames, features = _flow_inputs(2, 3, size, 16)
    frames.requires_grad_(True)
    features.requires_grad_(True)
    (head(frames, features) ** 2).mean().backward()
    for param_name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name
    # the last frame is only ever a frame B
    assert frames.grad[:, :, -1].abs().sum() > 0 and features.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["lite", "mol"])
def test_flow_head_clip_independence(name: str) -> None:
    config, size = FLOW_CONFIGS[name]
    torch.manual_seed(2)
    head = FlowHead(config, 16)
    frames, features = _flow_inputs(3, 3, size, 16, seed=3)
    together = head(frames, features)
    alone = head(frames[:1], features[:1])
    torch.testing.assert_close(alone, together[:1], rtol=1e-5, atol=1e-5)
    other = head(torch.cat([frames[:1], frames[1:].flip(-1)]), torch.cat([features[:1], features[1:] * 2]))
    torch.testing.assert_close(other[:1], together[:1], rtol=1e-5, atol=1e-5)


def _assert_per_clip_gradients(module: nn.Module, *inputs: torch.Tensor) -> None:
    """Opacus's per-sample gradients (one per clip, float64) equal the gradients of one-clip batches."""
    module = module.double()
    reference = copy.deepcopy(module)
    batch = inputs[0].shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the inputs need no gradient, functorch fallback for ConvTranspose3d
        wrapped = GradSampleModule(module, loss_reduction="sum")
        wrapped(*inputs).square().sum().backward()
    params = list(reference.parameters())
    for i in range(batch):
        grads = torch.autograd.grad(reference(*(x[i : i + 1] for x in inputs)).square().sum(), params)
        for (name, param), grad in zip(module.named_parameters(), grads, strict=True):
            assert param.grad_sample.shape == (batch, *param.shape), name
            torch.testing.assert_close(param.grad_sample[i], grad, rtol=1e-9, atol=1e-9 * grad.abs().max().item())


@pytest.mark.parametrize("name", ["lite", "mol"])
def test_flow_head_opacus_per_sample_gradients_are_per_clip(name: str) -> None:
    config, size = FLOW_CONFIGS[name]
    torch.manual_seed(4)
    _assert_per_clip_gradients(FlowHead(config, 16), *_flow_inputs(3, 3, size, 16, seed=5, dtype=torch.float64))


def _shifted_texture(gen: torch.Generator, n: int, size: int, shifts: list[int]) -> torch.Tensor:
    """Smooth random textures (n, 1, size, size + 2 * max shift) cut into frames f_k[x] = tex[x + m - shift_k]."""
    m = max(abs(s) for s in shifts)
    texture = F.avg_pool2d(torch.rand(n, 1, size + 1, size + 2 * m + 1, generator=gen), 2, stride=1)
    return torch.stack([texture[..., m - s : m - s + size] for s in shifts], dim=2)  # (n, 1, T, size, size)


def _train_flow(head: FlowHead, frames: torch.Tensor, target: torch.Tensor, steps: int, lr: float) -> float:
    """Fits ``head`` to one clip batch (zero F5C features) with the EPE loss; returns EPE / zero-flow EPE."""
    features = torch.zeros(frames.shape[0], 16, frames.shape[2] - 1, frames.shape[3] // 8, frames.shape[4] // 8)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)

    def epe() -> float:
        with torch.no_grad():
            return (head(frames, features) - target).norm(dim=1).mean().item()

    zero_flow_epe = target.norm(dim=1).mean().item()
    assert epe() > 0.5 * zero_flow_epe  # the untrained head is not already right
    for _ in range(steps):
        loss = (head(frames, features) - target).norm(dim=1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return epe() / zero_flow_epe


def test_flow_head_learns_a_one_pixel_shift() -> None:
    torch.manual_seed(0)
    frames = _shifted_texture(torch.Generator().manual_seed(0), 2, 32, [0, 1, 2])  # f_{k+1}[x + 1] = f_k[x]
    target = torch.zeros(2, 2, 2, 32, 32)
    target[:, 0] = 1.0  # flow (1, 0) for both pairs
    assert _train_flow(FlowHead(LITE.flow, 16), frames, target, steps=60, lr=3e-3) < 0.3  # about 0.06 px


def test_flow_head_tells_plus_from_minus_one_pixel_with_frame_a_fixed() -> None:
    # Both clips share frame A; frame B is A moved +1 px in one and -1 px in the other, so the direction is only
    # in frame B. A head that ignores frame B can at best predict zero flow (ratio 1).
    torch.manual_seed(0)
    frames = _shifted_texture(torch.Generator().manual_seed(1), 1, 32, [0, 1, -1])
    frames = torch.cat([frames[:, :, :2], frames[:, :, ::2]])  # clip 0: A then A + 1 px, clip 1: A then A - 1 px
    target = torch.zeros(2, 2, 1, 32, 32)
    target[0, 0], target[1, 0] = 1.0, -1.0
    assert torch.equal(frames[0, :, 0], frames[1, :, 0])
    head = FlowHead(dataclasses.replace(LITE.flow, skip_both_frames=True), 16)
    assert _train_flow(head, frames, target, steps=120, lr=1e-3) < 0.5


@pytest.mark.parametrize("config", [LITE.landmarks, MOL.landmarks], ids=["lite", "mol"])
@pytest.mark.parametrize("size", [4, 8, 16])
def test_landmark_head_shapes_and_centre_start(config, size: int) -> None:
    torch.manual_seed(0)
    head = LandmarkHead(32, size, config)
    points = head(torch.randn(3, 32, 2, size, size))
    assert points.shape == (3, 2, 68, 2)
    assert (points - 0.5).abs().max() < 0.1
    side = (size - 3) // config.stride + 1
    assert head.hidden.in_features == config.channels * side * side


def test_landmark_head_release_sizes_and_learning() -> None:
    head = LandmarkHead(128, 16, MOL.landmarks, norm=None)
    assert head.hidden.in_features == 6272 and head.hidden.out_features == 512 and head.out.out_features == 136
    torch.manual_seed(0)
    head = LandmarkHead(16, 8, LITE.landmarks)
    features = torch.randn(4, 16, 2, 8, 8)
    target = torch.rand(4, 2, 68, 2)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3)
    start = F.mse_loss(head(features), target).item()
    for _ in range(30):
        loss = F.mse_loss(head(features), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.5 * start


def test_landmark_head_frames_are_per_frame_and_clips_independent() -> None:
    torch.manual_seed(3)
    head = LandmarkHead(16, 8, LITE.landmarks, norm=None)  # without a norm each frame is on its own
    features = torch.randn(3, 16, 4, 8, 8)
    together = head(features)
    torch.testing.assert_close(head(features[:, :, 2:3]), together[:, 2:3])
    head = LandmarkHead(16, 8, LITE.landmarks)  # GroupNorm spans the clip's frames, never other clips
    together = head(features)
    torch.testing.assert_close(head(features[:1]), together[:1], rtol=1e-5, atol=1e-5)
    other = head(torch.cat([features[:1], features[1:] * 3]))
    torch.testing.assert_close(other[:1], together[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [LITE.landmarks, MOL.landmarks], ids=["lite", "mol"])
def test_landmark_head_opacus_per_sample_gradients_are_per_clip(config) -> None:
    torch.manual_seed(6)
    features = torch.randn(3, 16, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _assert_per_clip_gradients(LandmarkHead(16, 8, config), features)


def test_landmark_head_rejects_wrong_size() -> None:
    head = LandmarkHead(8, 8, LITE.landmarks)
    with pytest.raises(ValueError, match="side 8"):
        head(torch.randn(1, 8, 2, 6, 6))
    with pytest.raises(ValueError, match="T, s, s"):
        head(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="at least 3"):
        LandmarkHead(8, 2, LITE.landmarks)


@pytest.mark.parametrize("normalise", [True, False])
def test_normalised_motion_ignores_how_strongly_features_respond(normalise: bool) -> None:
    """With normalise_motion the head sees each clip's motion pattern, not its raw size (a faint movement
    reaches the classifier at full scale); without it, scaling the motion scales the head's input."""
    from models.config import RecognitionHeadConfig
    from models.recognition import RecognitionHead

    config = RecognitionHeadConfig(relative=True, normalise_motion=normalise)
    torch.manual_seed(0)
    head = RecognitionHead(channels=4, depth=14, feature_size=8, config=config, num_classes=3)
    stacked = torch.randn(2, 4, 14, 8, 8)
    weak, strong = head.motion_features(stacked), head.motion_features(5.0 * stacked)
    assert torch.allclose(weak, strong, atol=1e-4) == normalise
    still = stacked[:, :, :2].repeat(1, 1, 7, 1, 1)  # every pair equals the first: no motion
    torch.testing.assert_close(head.motion_features(still), head.motion_features(torch.zeros_like(still)))
