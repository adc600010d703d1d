"""F5C backbone: shapes, FCC's global receptive field, CCC against loop references, gradients, batch independence,
and Opacus per-sample gradients of the whole backbone (the clip, not the frame, is the batch item)."""

from __future__ import annotations

import copy
import warnings

import opacus
import pytest
import torch
import torch.nn.functional as F

from models.config import preset
from models.f5c import CCC, FCC, AxisEmbedding, CircularConv, F5CBackbone, F5CBlock, Stem

GRAPHS = ("positions", "channels")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: with a shared CPU, intra-op threads only spin (measured 4 s vs up to 27 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- Stem


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("side", [64, 128, 136])
def test_stem_divides_by_eight(side: int, activation: bool) -> None:
    stem = Stem(1, (8, 32, 64), 32, activation, "group", 8)
    assert stem(torch.randn(2, 1, 3, side, side)).shape == (2, 32, 3, side // 8, side // 8)
    assert stem(torch.randn(1, 1, 2, side, 48)).shape == (1, 32, 2, side // 8, 6)
    assert stem(torch.randn(2, 1, side, side)).shape == (2, 32, side // 8, side // 8)  # a single frame


def test_stem_activation_makes_it_nonlinear() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 2, 32, 32, dtype=torch.float64)
    for activation, linear in ((False, True), (True, False)):
        stem = Stem(1, (4, 8, 8), 8, activation, "group", 1).double()
        body = stem.layers[:-1]  # everything but the final norm
        zero = body(torch.zeros_like(x))
        # an affine map satisfies f(2x) - f(0) == 2 (f(x) - f(0))
        is_affine = torch.allclose(body(2 * x) - zero, 2 * (body(x) - zero), atol=1e-10)
        assert is_affine == linear


def test_stem_convolves_each_frame_on_its_own() -> None:
    """Without the clip-wide norm statistics (eval-mode BatchNorm), frame t of the output is the stem of frame t."""
    torch.manual_seed(9)
    stem = Stem(1, (4, 8, 8), 8, True, "batch").double().eval()
    clip = torch.randn(2, 1, 3, 32, 24, dtype=torch.float64)
    with torch.no_grad():
        out = stem(clip)
        for t in range(3):
            assert torch.allclose(out[:, :, t], stem(clip[:, :, t]), atol=1e-12)


# ----------------------------------------------------------------------------- FCC


def test_fcc_keeps_shape_and_checks_size() -> None:
    fcc = FCC(16, (8, 12), groups=4)
    x = torch.randn(3, 16, 2, 8, 12)
    assert fcc(x).shape == x.shape
    assert fcc(x[:, :, 0]).shape == (3, 16, 8, 12)  # a single frame
    with pytest.raises(ValueError):
        fcc(torch.randn(3, 16, 2, 8, 8))
    with pytest.raises(ValueError):
        fcc(torch.randn(16, 8, 12))
    with pytest.raises(ValueError):
        FCC(15, (8, 8))


def _bump_response(fcc: FCC, channel: int, frame: int) -> torch.Tensor:
    """|fcc(x + e) - fcc(x)| for a unit bump e at one pixel of one channel and frame: (C, T, h, w)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 3, 6, 7, dtype=torch.float64)
    bumped = x.clone()
    bumped[0, channel, frame, 4, 2] += 1.0
    with torch.no_grad():
        return (fcc(bumped) - fcc(x)).abs()[0]


@pytest.mark.parametrize("channel", [1, 6])  # one channel in each half
def test_fcc_global_receptive_field(channel: int) -> None:
    """One perturbed pixel changes every position of its own channel and frame, and nothing else.

    Eval-mode BatchNorm is a per-channel affine map, so only the circular convolutions spread the change
    (GroupNorm would spread it through its statistics, over channels and frames, and hide a local kernel).
    """
    torch.manual_seed(0)
    fcc = FCC(8, (6, 7), norm="batch").double().eval()
    diff = _bump_response(fcc, channel, frame=1)
    assert (diff[channel, 1] > 1e-9).all()
    others = [c for c in range(8) if c != channel]
    assert (diff[others] == 0).all()
    assert (diff[:, [0, 2]] == 0).all()  # frames do not mix


def test_fcc_receptive_field_test_catches_a_local_kernel() -> None:
    """The criterion above is not vacuous: with only one tap of each kernel left, the change stays local."""
    torch.manual_seed(0)
    fcc = FCC(8, (6, 7), norm="batch").double().eval()
    with torch.no_grad():
        for branch in (fcc.branch1, fcc.branch2):
            for conv in (branch.conv1, branch.conv2):
                conv.weight[:, 1:] = 0.0  # (C, L): keep tap 0 of the axis the kernel spans
    diff = _bump_response(fcc, 1, frame=1)
    assert diff[1, 1].sum() > 0
    assert not (diff[1, 1] > 1e-9).all()


def _circular_reference(y: torch.Tensor, conv: CircularConv, dim: int) -> torch.Tensor:
    """out[i] = sum_s k[s] y[(i + s) mod L] + b, straight from the definition, on (B, C, T, h, w)."""
    kernel = conv.weight  # (C, L)
    view = (1, -1, 1, 1, 1)
    out = sum(kernel[:, s].view(view) * torch.roll(y, -s, dims=dim) for s in range(kernel.shape[1]))
    return out + conv.bias.view(view)


def test_fcc_matches_definition() -> None:
    torch.manual_seed(1)
    fcc = FCC(8, (5, 6), norm="batch").double().eval()
    for module in fcc.modules():
        if isinstance(module, AxisEmbedding):
            torch.nn.init.normal_(module.weight)
    x = torch.randn(2, 8, 3, 5, 6, dtype=torch.float64)
    halves = []
    for part, branch, dims in zip(x.chunk(2, 1), (fcc.branch1, fcc.branch2), ((3, 4), (4, 3)), strict=True):
        y = branch.norm(part + branch.embed1.weight)
        y = _circular_reference(y, branch.conv1, dims[0]) + branch.embed2.weight
        halves.append(part + _circular_reference(y, branch.conv2, dims[1]))
    with torch.no_grad():
        want = torch.cat(halves, 1)
        assert torch.allclose(fcc(x), want, atol=1e-10)
        assert torch.allclose(fcc(x[:, :, 2]), want[:, :, 2], atol=1e-10)  # a single frame
    assert fcc.branch1.embed1.weight.shape == (1, 4, 1, 5, 1)
    assert fcc.branch2.embed1.weight.shape == (1, 4, 1, 1, 6)
    assert fcc.branch1.conv1.weight.shape == (4, 5) and fcc.branch2.conv1.weight.shape == (4, 6)


def test_axis_embedding_is_a_parameter_only_leaf() -> None:
    emb = AxisEmbedding(4, 9, "horizontal")
    assert list(emb.children()) == []
    assert [name for name, _ in emb.named_parameters()] == ["weight"]
    assert emb.weight.shape == (1, 4, 1, 1, 9)
    out = emb(torch.zeros(2, 4, 3, 5, 9))
    assert out.shape == (2, 4, 3, 5, 9)
    assert torch.equal(out[1, :, 2, 3], emb.weight[0, :, 0, 0].detach())
    assert torch.equal(emb(torch.zeros(2, 4, 5, 9))[1, :, 3], emb.weight[0, :, 0, 0].detach())  # a single frame
    assert AxisEmbedding(4, 5, "vertical").weight.shape == (1, 4, 1, 5, 1)
    with pytest.raises(ValueError):
        AxisEmbedding(4, 9, "diagonal")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- CCC references (plain loops)


def _cosine_topk(feats: torch.Tensor, k: int) -> torch.Tensor:
    """feats (nodes, dim) -> (nodes, k) neighbour indices, cosine similarity computed pair by pair."""
    nodes = feats.shape[0]
    sim = torch.empty(nodes, nodes, dtype=feats.dtype)
    for a in range(nodes):
        for b in range(nodes):
            sim[a, b] = feats[a] @ feats[b] / (feats[a].norm() * feats[b].norm())
    return torch.stack([torch.topk(sim[a], k).indices for a in range(nodes)])


def _ccc_positions_reference(ccc: CCC, x: torch.Tensor) -> torch.Tensor:
    n, c, frames, h, w = x.shape
    flat = x.reshape(n, c, frames, h * w)
    w1, b1, w2, b2 = ccc.node.weight, ccc.node.bias, ccc.edge.weight, ccc.edge.bias
    out = torch.empty_like(flat)
    for i in range(n):
        for t in range(frames):
            idx = _cosine_topk(flat[i, :, t].T, ccc.k)  # nodes: positions, features: C-vectors
            for ch in range(c):
                xc = flat[i, ch, t]
                best = None
                for j in range(ccc.k):
                    g = torch.stack([xc[idx[p, j]] for p in range(h * w)])
                    value = torch.relu(w1 @ xc + b1 + w2 @ (g - 2 * xc) + b2)
                    best = value if best is None else torch.maximum(best, value)
                out[i, ch, t] = best
    return x + out.view(n, c, frames, h, w)


def _ccc_channels_reference(ccc: CCC, x: torch.Tensor) -> torch.Tensor:
    n, c, frames, h, w = x.shape
    flat = x.reshape(n, c, frames, h * w)
    w1, w2 = ccc.node.weight, ccc.edge.weight
    edge = torch.empty_like(flat)
    for i in range(n):
        for t in range(frames):
            maps = flat[i, :, t]  # (C, P)
            idx = _cosine_topk(maps, ccc.k)  # nodes: channels, features: maps
            for ch in range(c):
                best = None
                for j in range(ccc.k):
                    value = torch.relu(w1 @ maps[ch] + w2 @ (maps[idx[ch, j]] - maps[ch]))
                    best = value if best is None else torch.maximum(best, value)
                edge[i, ch, t] = best
    mix_w, mix_b = ccc.mix.weight[:, :, 0, 0, 0], ccc.mix.bias
    mixed = torch.empty_like(edge)
    for i in range(n):
        for t in range(frames):
            for co in range(c):
                mixed[i, co, t] = sum(mix_w[co, ci] * edge[i, ci, t] for ci in range(c)) + mix_b[co]
    return x + mixed.view(n, c, frames, h, w)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("graph", GRAPHS)
def test_ccc_matches_loop_reference(graph: str, k: int) -> None:
    torch.manual_seed(2)
    ccc = CCC(6, (4, 4), k=k, graph=graph).double()
    for p in ccc.parameters():  # default init is too small to make the edge term matter much
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 6, 2, 4, 4, dtype=torch.float64)
    reference = _ccc_positions_reference if graph == "positions" else _ccc_channels_reference
    with torch.no_grad():
        got = ccc(x)
        want = reference(ccc, x)
        single = ccc(x[:, :, 1])  # a single frame
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert torch.allclose(single, want[:, :, 1], atol=1e-10, rtol=0)
    assert not torch.allclose(got, x)  # the edge term is not trivially zero


@pytest.mark.parametrize("graph", GRAPHS)
def test_ccc_graph_includes_self_first(graph: str) -> None:
    torch.manual_seed(3)
    ccc = CCC(6, (4, 4), k=3, graph=graph)
    x = torch.randn(2, 6, 3, 16)
    idx = ccc.neighbours(x)
    nodes = 16 if graph == "positions" else 6
    assert idx.shape == (2, 3, nodes, 3)
    assert torch.equal(idx[..., 0], torch.arange(nodes).expand(2, 3, nodes))


def test_ccc_positions_k1_is_self_only() -> None:
    """With k = 1 the only neighbour is the position itself, so g(x_c) = x_c."""
    torch.manual_seed(4)
    ccc = CCC(6, (3, 3), k=1).double()
    x = torch.randn(2, 6, 2, 3, 3, dtype=torch.float64)
    flat = x.reshape(2, 6, 2, 9)
    want = x + F.relu(ccc.node(flat) + ccc.edge(-flat)).view_as(x)
    with torch.no_grad():
        assert torch.allclose(ccc(x), want, atol=1e-12)


@pytest.mark.parametrize("side", [(8, 8), (16, 16), (17, 17)])
@pytest.mark.parametrize("graph", GRAPHS)
def test_ccc_and_block_shapes(graph: str, side: tuple[int, int]) -> None:
    x = torch.randn(2, 16, 3, *side)
    ccc = CCC(16, side, k=4, graph=graph)
    block = F5CBlock(16, side, k=4, graph=graph, groups=4)
    assert ccc(x).shape == block(x).shape == x.shape
    assert ccc(x[:, :, 0]).shape == block(x[:, :, 0]).shape == x[:, :, 0].shape  # a single frame
    with pytest.raises(ValueError):
        ccc(torch.randn(2, 16, 3, 5, 5))


def test_ccc_validates_arguments() -> None:
    with pytest.raises(ValueError, match="graph"):
        CCC(8, (4, 4), graph="pixels")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k="):
        CCC(8, (4, 4), k=0)
    with pytest.raises(ValueError, match="k="):
        CCC(8, (4, 4), k=17, graph="positions")
    with pytest.raises(ValueError, match="k="):
        CCC(8, (4, 4), k=9, graph="channels")
    ccc = CCC(8, (4, 4), k=16, graph="positions")
    assert (ccc.graph, ccc.k) == ("positions", 16)
    assert CCC(8, (4, 4), k=8, graph="channels").k == 8
    with pytest.raises(ValueError):
        F5CBlock(8, (4, 4), graph="pixels")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("name", ["lite", "mol"])
def test_backbone_shapes(name: str, graph: str) -> None:
    config = preset(name, image_size=64, ccc_graph=graph, frames=4)
    net = F5CBackbone(config)
    assert net.block1.ccc.graph == graph and net.block1 is not net.block2
    first, second = net(torch.randn(2, 4, 1, 64, 64))
    assert first.shape == second.shape == (2, config.channels, 3, 8, 8)
    assert F5CBackbone.stack_pairs(first, second).shape == (2, config.channels, 6, 8, 8)
    with pytest.raises(ValueError):
        net(torch.randn(2, 1, 1, 64, 64))


def test_backbone_pairs_frames_and_blocks() -> None:
    """first[:, :, k] is block1 on stem frame k, second[:, :, k] is block2 on stem frame k + 1."""
    torch.manual_seed(5)
    net = F5CBackbone(preset("lite", image_size=32, channels=16, frames=3)).double()
    clip = torch.randn(2, 3, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        first, second = net(clip)
        feats = net.stem(clip.transpose(1, 2))  # GroupNorm: statistics over the whole clip
        assert torch.allclose(first, net.block1(feats[:, :, :-1]), atol=1e-12)
        assert torch.allclose(second, net.block2(feats[:, :, 1:]), atol=1e-12)


def test_backbone_pairs_frames_one_by_one_without_clip_statistics() -> None:
    """With eval-mode BatchNorm nothing mixes frames: each pair output is the blocks on that single frame."""
    torch.manual_seed(5)
    net = F5CBackbone(preset("lite", image_size=32, channels=16, frames=3, norm="batch")).double().eval()
    clip = torch.randn(2, 3, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        first, second = net(clip)
        for k in range(2):
            assert torch.allclose(first[:, :, k], net.block1(net.stem(clip[:, k])), atol=1e-12)
            assert torch.allclose(second[:, :, k], net.block2(net.stem(clip[:, k + 1])), atol=1e-12)
        assert not torch.allclose(first[:, :, 0], net.block1(net.stem(clip[:, 1])), atol=1e-6)


def test_stack_pairs_interleaves_in_release_order() -> None:
    b, c, pairs, h, w = 2, 4, 3, 2, 2
    first = torch.arange(pairs).view(1, 1, pairs, 1, 1).expand(b, c, pairs, h, w).float()
    second = 100 + first
    stacked = F5CBackbone.stack_pairs(first, second)
    assert stacked.shape == (b, c, 2 * pairs, h, w)
    assert torch.equal(stacked[:, :, 0], first[:, :, 0])
    assert torch.equal(stacked[:, :, 1], second[:, :, 0])
    assert torch.equal(stacked[:, :, 2], first[:, :, 1])
    assert stacked[0, 0, :, 0, 0].tolist() == [0, 100, 1, 101, 2, 102]
    mixed = torch.randn(b, c, pairs, h, w)  # channels and pixels stay where they are
    assert torch.equal(F5CBackbone.stack_pairs(mixed, -mixed)[:, :, 4], mixed[:, :, 2])


@pytest.mark.parametrize("graph", GRAPHS)
def test_every_parameter_gets_a_gradient(graph: str) -> None:
    torch.manual_seed(6)
    net = F5CBackbone(preset("lite", image_size=32, channels=16, ccc_graph=graph, k=3, frames=3))
    first, second = net(torch.randn(2, 3, 1, 32, 32))
    (first.sum() + second.sum()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("graph", GRAPHS)
def test_samples_are_independent(graph: str) -> None:
    torch.manual_seed(7)
    net = F5CBackbone(preset("lite", image_size=32, channels=16, ccc_graph=graph, frames=3)).double()
    clip = torch.randn(4, 3, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        alone = net(clip[:1])
        together = net(clip)
    for a, b in zip(alone, together, strict=True):
        assert torch.allclose(a[0], b[0], atol=1e-6)


# ----------------------------------------------------------------------------- Opacus per-sample gradients


def _check_per_sample_gradients(module: torch.nn.Module, inputs: torch.Tensor, loss) -> None:
    """Opacus's grad_sample for every parameter equals the gradient of ``loss`` on each sample alone."""
    single = copy.deepcopy(module)
    n = inputs.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = opacus.GradSampleModule(module, loss_reduction="sum")
        loss(wrapped(inputs), slice(None)).backward()
    for i in range(n):
        single.zero_grad()
        loss(single(inputs[i : i + 1]), slice(i, i + 1)).backward()
        for (name, p), q in zip(module.named_parameters(), single.parameters(), strict=True):
            assert p.grad_sample is not None, name
            assert p.grad_sample.shape == (n, *p.shape), name
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-10), name


@pytest.mark.parametrize("part", ["fcc", "ccc-positions", "ccc-channels"])
def test_opacus_per_sample_gradients_are_exact(part: str) -> None:
    """Opacus's hooks (native Conv3d/Linear/GroupNorm rules, functorch for AxisEmbedding) give each
    sample's own gradient: the design constraint behind padding outside the convs and the leaf embeddings."""
    torch.manual_seed(8)
    if part == "fcc":
        module = FCC(8, (6, 6), groups=2).double()
    else:
        module = CCC(8, (6, 6), k=3, graph=part.removeprefix("ccc-")).double()
    x = torch.randn(3, 8, 2, 6, 6, dtype=torch.float64)
    weights = torch.randn_like(x)
    _check_per_sample_gradients(module, x, lambda out, rows: (out * weights[rows]).sum())


@pytest.mark.parametrize("graph", GRAPHS)
def test_opacus_per_sample_gradients_of_the_whole_backbone(graph: str) -> None:
    """The point of the clip-first layout: one exact gradient per clip, for every parameter of the backbone."""
    torch.manual_seed(10)
    net = F5CBackbone(preset("lite", image_size=32, ccc_graph=graph)).double()
    frames = net.config.frames
    clip = torch.randn(3, frames, 1, 32, 32, dtype=torch.float64)
    weights = torch.randn(3, net.config.channels, frames - 1, 4, 4, dtype=torch.float64)

    def loss(out: tuple[torch.Tensor, torch.Tensor], rows: slice) -> torch.Tensor:
        first, second = out
        return (first**2).sum() + (second * weights[rows]).sum()

    _check_per_sample_gradients(net, clip, loss)
