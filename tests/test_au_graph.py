"""FED-PsyAU's AU graph head: priors, AU regions, pooling, graph attention and the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.au_graph import (
    AUGraphHead,
    GraphAttention,
    RegionPooling,
    au_region_centres,
    cooccurrence_counts,
    cooccurrence_from_counts,
    load_prior,
    region_weights,
)
from models.config import AUGraphConfig
from partitions.action_units import AU_NODES

AU = {au: k for k, au in enumerate(AU_NODES)}


def mean_face() -> torch.Tensor:
    """A frontal iBUG-68 face in crop units (x right, y down), shaped like a mean face: (68, 2)."""
    phi = np.linspace(0.0, np.pi, 17)
    jaw = np.stack([0.5 - 0.42 * np.cos(phi), 0.42 + 0.38 * np.sin(phi)], axis=1)
    t = np.linspace(0.0, 1.0, 5)
    arch = 0.03 * (1 - (2 * t - 1) ** 2)
    right_brow = np.stack([0.17 + 0.27 * t, 0.30 - arch], axis=1)
    left_brow = np.stack([0.56 + 0.27 * t, 0.30 - arch], axis=1)
    bridge = np.stack([np.full(4, 0.5), np.linspace(0.38, 0.55, 4)], axis=1)
    nostrils = np.stack([0.5 + np.array([-0.08, -0.04, 0, 0.04, 0.08]), 0.6 + np.array([0, 0.01, 0.015, 0.01, 0])], 1)
    right_eye = [(0.22, 0.40), (0.27, 0.38), (0.33, 0.38), (0.38, 0.40), (0.33, 0.415), (0.27, 0.415)]
    left_eye = [(0.62, 0.40), (0.67, 0.38), (0.73, 0.38), (0.78, 0.40), (0.73, 0.415), (0.67, 0.415)]
    w, lip = 0.16, 0.04
    outer = [(-w, 0), (-0.6 * w, -0.8 * lip), (-0.2 * w, -1.1 * lip), (0, -0.9 * lip), (0.2 * w, -1.1 * lip),
             (0.6 * w, -0.8 * lip), (w, 0), (0.6 * w, lip), (0.2 * w, 1.3 * lip), (0, 1.35 * lip),
             (-0.2 * w, 1.3 * lip), (-0.6 * w, lip)]  # fmt: skip
    inner = [(-0.85 * w, 0), (-0.3 * w, -0.15 * lip), (0, -0.12 * lip), (0.3 * w, -0.15 * lip), (0.85 * w, 0),
             (0.3 * w, 0.15 * lip), (0, 0.12 * lip), (-0.3 * w, 0.15 * lip)]  # fmt: skip
    mouth = np.array(outer + inner) + np.array([0.5, 0.70])
    points = np.concatenate([jaw, right_brow, left_brow, bridge, nostrils, right_eye, left_eye, mouth])
    assert points.shape == (68, 2)
    return torch.tensor(points, dtype=torch.float32)


def faces(batch: int, seed: int = 0) -> torch.Tensor:
    """(B, 68, 2): the mean face, shifted, scaled and jittered per sample."""
    g = torch.Generator().manual_seed(seed)
    base = mean_face()
    scale = 0.8 + 0.3 * torch.rand(batch, 1, 1, generator=g)
    shift = 0.08 * (torch.rand(batch, 1, 2, generator=g) - 0.5)
    return (base - 0.5) * scale + 0.5 + shift + 0.004 * torch.randn(batch, 68, 2, generator=g)


# ----------------------------------------------------------------------------------------------- prior


def test_load_prior_shapes_order_and_values():
    prior = load_prior()
    assert prior.aus == AU_NODES
    assert prior.upper_mask.shape == prior.lower_mask.shape == (6, 6)
    assert prior.global_mask.shape == prior.cooccurrence.shape == (12, 12)
    for mask in (prior.upper_mask, prior.lower_mask, prior.global_mask):
        assert mask.dtype == torch.float32
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert (mask.diagonal() == 1).all()
    assert torch.allclose(prior.cooccurrence.sum(dim=1), torch.ones(12), atol=2e-3)
    assert (prior.cooccurrence >= 0).all()
    prior.cooccurrence.zero_()  # fresh tensors each call: mutating one copy leaves the next load intact
    assert load_prior().cooccurrence.sum() > 11


def test_published_region_matrices_are_blocks_of_the_global_one():
    """The release's upper matrix is the row-normalised upper block of its global matrix (a transcription check)."""
    import json
    from importlib import resources

    raw = json.loads(resources.files("models").joinpath("data/au_coordination_prior.json").read_text())
    block = load_prior().cooccurrence[:6, :6]
    upper = torch.tensor(raw["statistical_cooccurrence"]["upper"])
    assert torch.allclose(block / block.sum(dim=1, keepdim=True), upper, atol=2e-3)


def test_cooccurrence_from_counts_hand_example():
    targets = torch.zeros(4, 12)
    targets[0, [AU[1], AU[2]]] = 1  # AU1 + AU2
    targets[1, [AU[1], AU[2], AU[4]]] = 1
    targets[2, [AU[1]]] = 1
    targets[3, [AU[12]]] = 1
    counts = cooccurrence_counts(targets)
    assert counts[AU[1], AU[1]] == 3 and counts[AU[1], AU[2]] == 2 and counts[AU[2], AU[4]] == 1
    p = cooccurrence_from_counts(counts)
    assert p[AU[1], AU[1]] == 1 and p[AU[1], AU[2]] == pytest.approx(2 / 3) and p[AU[1], AU[4]] == pytest.approx(1 / 3)
    assert p[AU[2], AU[1]] == 1 and p[AU[2], AU[4]] == pytest.approx(1 / 2)
    assert p[AU[4]].tolist() == [1.0 if j in (AU[1], AU[2], AU[4]) else 0.0 for j in range(12)]
    assert p[AU[12]].tolist() == torch.eye(12)[AU[12]].tolist()
    assert torch.equal(p[AU[17]], torch.eye(12)[AU[17]])  # never seen: identity row
    with pytest.raises(ValueError, match="cooccurrence_counts"):
        cooccurrence_from_counts(targets)
    with pytest.raises(ValueError, match="non-negative"):
        cooccurrence_from_counts(-torch.ones(12, 12))


# ----------------------------------------------------------------------------------------------- regions


def test_region_weights_are_affine_combinations():
    weights = region_weights()
    assert weights.shape == (12, 2, 68)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(12, 2), atol=1e-6)


def test_au_region_centres_on_a_mean_face():
    face = mean_face()
    centres = au_region_centres(face[None])[0]  # (12, 2 sides, 2)
    assert centres.shape == (12, 2, 2)
    eye_top = face[36:48, 1].min()
    au1, au2 = centres[AU[1]], centres[AU[2]]
    assert (au1[:, 1] < eye_top).all() and (au2[:, 1] < eye_top).all()
    assert au2[0, 0] < au1[0, 0] < au1[1, 0] < au2[1, 0]  # AU1 between AU2's centres
    assert torch.allclose(centres[AU[12]], face[[48, 54]], atol=1e-6)
    mouth_bottom = face[48:60, 1].max()
    assert (centres[AU[17], :, 1] > mouth_bottom).all() and torch.equal(centres[AU[17], 0], centres[AU[17], 1])
    assert (centres[AU[17], :, 1] < face[8, 1]).all()
    assert (centres[AU[15], :, 1] > face[[48, 54], 1]).all()  # below the corners
    assert centres[AU[14], 0, 0] < face[48, 0] and centres[AU[14], 1, 0] > face[54, 0]  # outside the corners
    assert (centres[AU[6], :, 1] > face[[41, 46], 1]).all()  # cheeks below the lower lids
    # the centres follow the face: shifting the landmarks shifts every centre by the same amount
    shift = torch.tensor([0.05, -0.03])
    assert torch.allclose(au_region_centres((face + shift)[None])[0], centres + shift, atol=1e-6)


def test_au_centres_sit_on_the_synthetic_faces_moving_regions():
    """Each centre lies near a control point that the AU moves in fedmer's synthetic clips (partitions.synth)."""
    from partitions.synth.face import landmarks_unit, random_identity
    from partitions.synth.motion import AU_MOVES

    rng = np.random.default_rng(0)
    landmarks = torch.tensor(np.stack([landmarks_unit(random_identity(rng)) for _ in range(5)]), dtype=torch.float32)
    centres = au_region_centres(landmarks)  # (5, 12, 2, 2)
    interocular = (landmarks[:, 45] - landmarks[:, 36]).norm(dim=-1)
    for k, au in enumerate(AU_NODES):
        moved = landmarks[:, [move[0] for move in AU_MOVES[au]]]  # (5, K, 2)
        nearest = (centres[:, k, :, None] - moved[:, None]).norm(dim=-1).amin(dim=-1)  # (5, 2)
        assert (nearest < 0.4 * interocular[:, None]).all(), au


def test_region_pooling_windows_sum_to_one_and_peak_at_the_centre():
    pooling = RegionPooling(0.15)
    landmarks = faces(3)
    windows = pooling.weights(landmarks, (16, 16))
    assert windows.shape == (3, 12, 16, 16)
    assert torch.allclose(windows.sum(dim=(-2, -1)), torch.ones(3, 12), atol=1e-5)
    centres = au_region_centres(landmarks)  # (3, 12, 2, 2)
    peak = windows.flatten(2).argmax(dim=-1)  # (3, 12)
    peak_xy = torch.stack([(peak % 16 + 0.5) / 16, (peak // 16 + 0.5) / 16], dim=-1)  # (3, 12, 2)
    distance = (peak_xy[:, :, None] - centres).abs().amax(dim=-1).amin(dim=-1)  # to the nearer centre
    assert (distance <= 1.5 / 16).all()


def test_region_pooling_finds_a_bump_at_au12():
    pooling = RegionPooling(0.15)
    face = mean_face()[None]
    x, y = au_region_centres(face)[0, AU[12], 0]
    features = torch.zeros(1, 1, 16, 16)
    features[0, 0, int(y * 16), int(x * 16)] = 1.0
    nodes = pooling(features, face)
    assert nodes.shape == (1, 12, 1)
    assert nodes[0, AU[12], 0] > 10 * nodes[0, AU[1], 0]
    assert nodes[0, :, 0].argmax() in (AU[12], AU[14])


def test_region_pooling_does_not_train_landmarks():
    landmarks = faces(2).requires_grad_(True)
    features = torch.randn(2, 4, 8, 8, requires_grad=True)
    RegionPooling(0.15)(features, landmarks).sum().backward()
    assert landmarks.grad is None and features.grad is not None


# ----------------------------------------------------------------------------------------------- graph


def _masked_softmax(layer: GraphAttention, nodes: torch.Tensor) -> torch.Tensor:
    wh = layer.W(nodes)
    scores = F.leaky_relu(layer.a_src(wh) + layer.a_dst(wh).transpose(1, 2), 0.2)
    return torch.softmax(scores.masked_fill(layer.mask == 0, float("-inf")), dim=-1)


def _layer(beta: float = 0.3) -> tuple[GraphAttention, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mask = load_prior().global_mask
    layer = GraphAttention(8, mask, beta=beta)
    nodes = torch.randn(3, 12, 8)
    prior = torch.rand(12, 12)
    return layer, mask, nodes, prior


def test_graph_attention_is_masked_and_row_stochastic():
    layer, mask, nodes, prior = _layer()
    for r in (0.0, 0.5, torch.tensor([0.0, 0.5, 1.0])):
        out, attention = layer(nodes, prior, r, return_attention=True)
        assert out.shape == nodes.shape and attention.shape == (3, 12, 12)
        assert (attention[:, mask == 0] == 0).all()
        assert torch.allclose(attention.sum(dim=-1), torch.ones(3, 12), atol=1e-6)
        assert (attention[:, mask == 1] > 0).all()


def test_graph_attention_limits():
    layer, mask, nodes, prior = _layer(beta=1.0)
    _, plain = layer(nodes, prior, 0.0, return_attention=True)
    assert torch.allclose(plain, _masked_softmax(layer, nodes), atol=1e-6)
    _, pure_prior = layer(nodes, prior, 1.0, return_attention=True)
    on_edges = prior * mask
    expected = on_edges / on_edges.sum(dim=1, keepdim=True)
    assert torch.allclose(pure_prior, expected.expand(3, 12, 12), atol=1e-6)
    _, half = layer(nodes, prior, 0.5, return_attention=True)
    assert torch.allclose(half, 0.5 * plain + 0.5 * expected, atol=1e-6)


def test_graph_attention_prior_without_mass_on_a_row_falls_back_to_uniform():
    layer, mask, nodes, _ = _layer(beta=1.0)
    prior = torch.eye(12)
    prior[0] = 1 - mask[0]  # row 0 of the prior lies entirely on non-edges
    _, attention = layer(nodes, prior, 1.0, return_attention=True)
    assert torch.allclose(attention[:, 0], (mask[0] / mask[0].sum()).expand(3, 12), atol=1e-6)


def test_graph_attention_gradients_reach_every_parameter():
    layer, _, nodes, prior = _layer()
    out = layer(nodes, prior, 0.5)
    (out * torch.randn_like(out)).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_graph_attention_rejects_bad_inputs():
    with pytest.raises(ValueError, match="binary"):
        GraphAttention(4, torch.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="at least one edge"):
        GraphAttention(4, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    layer, _, nodes, prior = _layer()
    with pytest.raises(ValueError, match="r has shape"):
        layer(nodes, prior, torch.zeros(2))


# ----------------------------------------------------------------------------------------------- head


def _head(node_dim: int = 16) -> AUGraphHead:
    torch.manual_seed(0)
    return AUGraphHead(8, AUGraphConfig(node_dim=node_dim)).eval()


def _inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 8, 16, 16, generator=g), faces(batch, seed=2)


def test_head_shapes():
    head = _head()
    features, landmarks = _inputs()
    logits, embedding = head(features, landmarks, 0.5)
    assert logits.shape == (4, 12)
    assert embedding.shape == (4, head.embedding_dim) == (4, 12 * 16)
    assert torch.isfinite(logits).all() and torch.isfinite(embedding).all()
    assert head.cooccurrence.shape == (12, 12) and "cooccurrence" in head.state_dict()


def test_head_samples_are_independent():
    head = _head()
    features, landmarks = _inputs()
    r = torch.tensor([0.3, 1.0, 0.0, 0.7])
    batch_logits, batch_embedding = head(features, landmarks, r)
    alone_logits, alone_embedding = head(features[:1], landmarks[:1], r[:1])
    assert torch.allclose(batch_logits[:1], alone_logits, atol=1e-6)
    assert torch.allclose(batch_embedding[:1], alone_embedding, atol=1e-6)
    other = features.clone()
    other[1:] = torch.randn(3, 8, 16, 16)
    assert torch.allclose(head(other, landmarks, r)[0][:1], batch_logits[:1], atol=1e-6)


def test_set_cooccurrence_matters_only_when_r_is_positive():
    head = _head()
    features, landmarks = _inputs()
    before = {r: head(features, landmarks, r)[0] for r in (0.0, 1.0)}
    counts = torch.rand(12, 12, generator=torch.Generator().manual_seed(3)) + 0.1
    counts[5] = 0  # a row without evidence becomes an identity row
    head.set_cooccurrence(counts)
    assert torch.allclose(head.cooccurrence.sum(dim=1), torch.ones(12), atol=1e-6)
    assert torch.equal(head.cooccurrence[5], torch.eye(12)[5])
    assert torch.equal(head(features, landmarks, 0.0)[0], before[0.0])
    assert not torch.allclose(head(features, landmarks, 1.0)[0], before[1.0], atol=1e-4)


@pytest.mark.parametrize(
    ("matrix", "problem"),
    [
        (torch.ones(6, 6), "shape"),
        (torch.full((12, 12), float("nan")), "finite"),
        (torch.full((12, 12), float("inf")), "finite"),
        (-torch.ones(12, 12), "non-negative"),
    ],
)
def test_set_cooccurrence_rejects_invalid_matrices(matrix, problem):
    head = _head()
    before = head.cooccurrence.clone()
    with pytest.raises(ValueError, match=problem):
        head.set_cooccurrence(matrix)
    assert torch.equal(head.cooccurrence, before)


def test_head_gradients_reach_every_parameter():
    head = _head().train()
    features, landmarks = _inputs()
    logits, _ = head(features, landmarks, 0.5)
    (logits * torch.randn_like(logits)).sum().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # nn.Embedding's integer input has no gradient
def test_head_parameters_live_in_opacus_supported_layers():
    """Opacus's per-sample gradients equal the gradients of each sample alone."""
    opacus = pytest.importorskip("opacus")
    head = _head().train()  # Opacus records activations in training mode only
    features, landmarks = _inputs(3)
    head(features[1:2], landmarks[1:2], 0.5)[0].pow(2).sum().backward()
    alone = {name: parameter.grad.clone() for name, parameter in head.named_parameters()}
    head.zero_grad(set_to_none=True)
    wrapped = opacus.GradSampleModule(head, loss_reduction="sum")
    logits, _ = wrapped(features, landmarks, 0.5)
    logits.pow(2).sum().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad_sample is not None and parameter.grad_sample.shape[0] == 3, name
        assert torch.allclose(parameter.grad_sample[1], alone[name], atol=1e-5), name
    wrapped._close()
