"""The whole F5C multitask network: shapes, gradients, batch independence, Opacus, learning."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from models import MultitaskLoss, build_model, preset
from models.config import RecognitionHeadConfig
from models.losses import LossWeights
from models.network import ModelOutput

AU_COUNT, POINTS = 12, 68


def random_batch(config, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch shaped like ``partitions.dataset.ClipDataset``'s items."""
    g = torch.Generator().manual_seed(seed)
    t, size = config.frames, config.image_size
    landmarks = 0.3 + 0.4 * torch.rand(batch, t, POINTS, 2, generator=g)
    landmarks[..., 36, :] = torch.tensor([0.3, 0.4])
    landmarks[..., 45, :] = torch.tensor([0.7, 0.4])
    return {
        "clip": torch.rand(batch, t, 1, size, size, generator=g),
        "flow": torch.randn(batch, t - 1, 2, size, size, generator=g),
        "landmarks": landmarks,
        "label": torch.randint(0, config.num_classes, (batch,), generator=g),
        "au": (torch.rand(batch, AU_COUNT, generator=g) > 0.7).float(),
        "au_mask": torch.ones(batch, dtype=torch.bool),
    }


@pytest.mark.parametrize("name", ["lite", "mol"])
@pytest.mark.parametrize("graph", ["positions", "channels"])
@pytest.mark.parametrize("size", [64, 72])
def test_output_shapes(name: str, graph: str, size: int) -> None:
    config = preset(name, image_size=size, ccc_graph=graph, num_classes=5)
    model = build_model(config).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 8, 1, size, size))
    assert out.logits.shape == (2, 5)
    assert out.flow.shape == (2, 7, 2, size, size)
    assert out.landmarks.shape == (2, 8, POINTS, 2)
    assert out.au_logits.shape == (2, AU_COUNT)


def test_other_clip_lengths_and_heads_off() -> None:
    config = preset("lite", image_size=32, frames=4, flow_head=False, au_head=False)
    out = build_model(config).eval()(torch.rand(1, 4, 1, 32, 32))
    assert out.flow is None and out.au_logits is None and out.landmarks.shape == (1, 4, POINTS, 2)


def test_wrong_clip_shape_names_the_expected_shape() -> None:
    model = build_model(preset("lite", image_size=32))
    with pytest.raises(ValueError, match=r"\(batch, 8, 1, 32, 32\)"):
        model(torch.rand(1, 8, 1, 64, 64))


def test_au_head_without_landmarks_is_refused() -> None:
    model = build_model(preset("lite", image_size=32, landmark_head=False))
    with pytest.raises(ValueError, match="needs landmarks"):
        model(torch.rand(1, 8, 1, 32, 32))


def test_lite_preset_stays_under_8m_parameters_at_128() -> None:
    lite = build_model(preset("lite"))
    assert sum(p.numel() for p in lite.parameters()) <= 8_000_000


@pytest.mark.parametrize("graph", ["positions", "channels"])
def test_every_parameter_receives_gradient(graph: str) -> None:
    config = preset("lite", image_size=32, ccc_graph=graph, recognition=RecognitionHeadConfig(dropout=0.0))
    model = build_model(config)
    batch = random_batch(config)
    total, _ = MultitaskLoss()(model(batch["clip"], batch["landmarks"], prior_weight=0.5), batch)
    total.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_predictions_do_not_depend_on_the_rest_of_the_batch() -> None:
    config = preset("lite", image_size=32)
    model = build_model(config).eval()
    batch = random_batch(config, batch=4, seed=1)
    with torch.no_grad():
        alone = model(batch["clip"][:1], prior_weight=0.7)
        together = model(batch["clip"], prior_weight=0.7)
    for name in ("logits", "flow", "landmarks", "au_logits"):
        torch.testing.assert_close(getattr(together, name)[:1], getattr(alone, name), atol=1e-5, rtol=1e-5)


def test_loss_masks_samples_without_action_units() -> None:
    config = preset("lite", image_size=32, recognition=RecognitionHeadConfig(dropout=0.0))
    model = build_model(config)
    batch = random_batch(config, batch=2)
    batch["au_mask"] = torch.tensor([True, False])
    output = model(batch["clip"], batch["landmarks"])
    output.au_logits.retain_grad()
    total, terms = MultitaskLoss(LossWeights(mer=0, flow=0, landmarks=0, au=1))(output, batch)
    total.backward()
    assert output.au_logits.grad[1].abs().sum() == 0 and output.au_logits.grad[0].abs().sum() > 0
    assert terms["au"] > 0


def test_label_smoothing_keeps_a_confident_right_answer_from_zero_loss() -> None:
    """With smoothing e over C classes the CE target is (1 - e) on the label and e / C on every class."""
    config = preset("lite", image_size=32, num_classes=3)
    batch = random_batch(config, batch=2)
    logits = torch.full((2, 3), -20.0)
    logits[torch.arange(2), batch["label"]] = 20.0
    output = ModelOutput(logits=logits, flow=None, landmarks=None, au_logits=None)
    plain = MultitaskLoss().terms(output, batch)["mer"]
    smoothed = MultitaskLoss(label_smoothing=0.3).terms(output, batch)["mer"]
    assert float(plain.max()) < 1e-6
    torch.testing.assert_close(smoothed, torch.full((2,), 0.3 * 2 / 3 * 40.0), rtol=1e-4, atol=1e-4)


def test_opacus_per_sample_gradients_match_a_per_example_loop() -> None:
    from opacus import GradSampleModule

    config = preset("lite", image_size=32, recognition=RecognitionHeadConfig(dropout=0.0))
    torch.manual_seed(0)
    model = build_model(config).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in random_batch(config, batch=3).items()}
    loss_fn = MultitaskLoss()

    looped = []
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        model.zero_grad()
        loss_fn(model(one["clip"], one["landmarks"], prior_weight=0.5), one)[0].backward()
        looped.append({name: p.grad.clone() for name, p in model.named_parameters()})

    wrapped = GradSampleModule(model, loss_reduction="mean")
    wrapped.zero_grad()
    loss_fn(wrapped(batch["clip"], batch["landmarks"], prior_weight=0.5), batch)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, f"Opacus computed no per-sample gradient for {name}"
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], looped[i][name], atol=1e-8, rtol=1e-6, msg=name)


def moving_texture_batch(config, batch: int = 4) -> dict[str, torch.Tensor]:
    """Smooth textures translating by a per-sample constant flow, labelled by its direction."""
    g = torch.Generator().manual_seed(3)
    size, t = config.image_size, config.frames
    base = torch.nn.functional.interpolate(
        torch.rand(batch, 1, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear", align_corners=False
    )
    velocity = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])[:batch]
    frames = [
        torch.roll(base, shifts=(int(k * velocity[b, 1]), int(k * velocity[b, 0])), dims=(-2, -1))[b]
        for b in range(batch)
        for k in range(t)
    ]
    clip = torch.stack(frames).reshape(batch, t, 1, size, size)
    flow = velocity[:, None, :, None, None].expand(batch, t - 1, 2, size, size).clone()
    out = random_batch(config, batch=batch, seed=4)
    face = out["landmarks"][:1, :1]  # one face, placed per sample and moving with the texture
    steps = torch.arange(t, dtype=torch.float32)[None, :, None, None]
    landmarks = face + 0.1 * velocity[:, None, None, :] * (1 + steps / t)
    out.update(clip=clip, flow=flow, landmarks=landmarks, label=torch.arange(batch) % config.num_classes)
    return out


def test_model_overfits_a_tiny_batch_on_every_task() -> None:
    config = preset("lite", image_size=32, num_classes=4, recognition=RecognitionHeadConfig(dropout=0.0))
    torch.manual_seed(0)
    model = build_model(config)
    batch = moving_texture_batch(config)
    loss_fn = MultitaskLoss(LossWeights(mer=1.0, flow=1.0, landmarks=1.0, au=1.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(150):  # landmarks need about 150 steps next to the normalised motion's strong mer gradient
        optimizer.zero_grad()
        total, terms = loss_fn(model(batch["clip"], batch["landmarks"]), batch)
        total.backward()
        optimizer.step()
        history.append(terms)
    for name in ("mer", "flow", "landmarks", "au"):
        first, last = history[0][name], min(h[name] for h in history[-5:])
        assert last < 0.5 * first, f"{name} loss only went from {first:.3f} to {last:.3f}"
    assert history[-1]["mer"] < math.log(4) / 4


def test_config_rejects_sizes_that_are_not_multiples_of_eight() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        preset("lite", image_size=100)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    assert replace(preset("mol"), num_classes=7).flow.patch == 21


def test_relative_recognition_ignores_the_appearance_of_a_still_clip() -> None:
    config = preset("lite", image_size=32, au_head=False, recognition=RecognitionHeadConfig(relative=True))
    model = build_model(config).eval()
    faces = torch.rand(2, 1, 1, 32, 32).expand(2, 8, 1, 32, 32)  # two different faces, no motion
    with torch.no_grad():
        logits = model(faces).logits
    torch.testing.assert_close(logits[0], logits[1])
    moving = faces.clone()
    moving[1, 4:] = torch.roll(moving[1, 4:], 2, dims=-1)
    with torch.no_grad():
        assert not torch.allclose(model(moving).logits[1], logits[1])
