"""Local training helpers: metric definitions (MEGC2019 UF1/UAR) and one training pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import precision
from client.training import Predictions, evaluate, scores, train_epoch
from models import MultitaskLoss, build_model, preset
from models.config import RecognitionHeadConfig


def test_uf1_is_macro_f1_over_the_label_space_and_uar_mean_recall_over_present_classes() -> None:
    predictions = Predictions(labels=[0, 0, 0, 1, 1, 2], predicted=[0, 0, 1, 1, 1, 1])
    result = scores(predictions, num_classes=3)
    # class 0: P=1, R=2/3 -> F1 0.8; class 1: P=2/4, R=1 -> F1 2/3; class 2: F1 0
    assert result["uf1"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert result["uar"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert result["accuracy"] == pytest.approx(4 / 6)


def test_no_clip_gives_undefined_scores_instead_of_a_crash() -> None:
    # an empty test split, or a DP epoch whose Poisson batches drew no clip
    result = scores(Predictions(), num_classes=3)
    assert result["samples"] == 0
    assert all(np.isnan(result[key]) for key in ("uf1", "uar", "accuracy"))


def test_optional_metrics_appear_only_with_their_targets() -> None:
    predictions = Predictions(
        labels=[0, 1],
        predicted=[0, 1],
        flow_epe=[0.5, 1.5],
        au_true=[np.array([1, 0]), np.array([0, 1])],
        au_predicted=[np.array([1, 0]), np.array([1, 1])],
    )
    result = scores(predictions, num_classes=2)
    assert result["flow_epe"] == pytest.approx(1.0) and "landmark_nme" not in result
    assert result["au_f1"] == pytest.approx((2 / 3 + 1.0) / 2)


def batches(config, count: int = 2, size: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    t, s = config.frames, config.image_size
    landmarks = 0.3 + 0.4 * torch.rand(size, t, 68, 2, generator=g)
    return [
        {
            "clip": torch.rand(size, t, 1, s, s, generator=g),
            "flow": torch.zeros(size, t - 1, 2, s, s),
            "gt_flow": torch.zeros(size, t - 1, 2, s, s),
            "gt_mask": torch.tensor([True, False]),
            "landmarks": landmarks,
            "label": torch.tensor([0, 1]),
            "au": torch.zeros(size, 12),
            "au_mask": torch.tensor([True, False]),
        }
        for _ in range(count)
    ]


def test_train_epoch_updates_the_model_and_evaluate_scores_every_head() -> None:
    config = preset("lite", image_size=32, num_classes=2, recognition=RecognitionHeadConfig(dropout=0.0))
    torch.manual_seed(0)
    model = build_model(config)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    terms = train_epoch(
        model,
        batches(config),
        torch.optim.SGD(model.parameters(), lr=0.01),
        MultitaskLoss(),
        prior_weight=1.0,
        on_step=seen.append,
    )
    assert len(seen) == 2 and set(terms) == {"mer", "flow", "landmarks", "au", "loss"}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    result = evaluate(model, batches(config, count=1), num_classes=2)
    assert result["samples"] == 2
    assert {"uf1", "uar", "au_f1", "flow_epe", "flow_epe_exact", "landmark_nme"} <= set(result)


def one_step(model, batch: dict[str, torch.Tensor], dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    """train_epoch on one batch under ``dtype`` autocast: its loss and the gradient of every parameter (SGD at
    lr 0 keeps the weights, so both precisions start from the same network; dropout is seeded alike)."""
    torch.manual_seed(0)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = train_epoch(model, [batch], optimiser, MultitaskLoss(), prior_weight=0.5, precision=dtype)["loss"]
    return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_bf16_autocast_agrees_with_fp32_within_the_stated_tolerance() -> None:
    # README "Cost of a training step": one step's loss within 5 %, its gradient's direction within cosine 0.85
    config = preset("lite", image_size=32, frames=4)
    torch.manual_seed(0)
    model = build_model(config)
    batch = batches(config, count=1)[0]
    fp32_loss, fp32_gradient = one_step(model, batch, None)
    bf16_loss, bf16_gradient = one_step(model, batch, torch.bfloat16)
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)
    assert torch.nn.functional.cosine_similarity(fp32_gradient, bf16_gradient, dim=0) > 0.85
    assert fp32_gradient.dtype == bf16_gradient.dtype == torch.float32  # the parameters stay fp32
    assert not torch.equal(fp32_gradient, bf16_gradient)  # bf16 did run


def test_bf16_is_used_where_native_and_falls_back_to_fp32_with_a_warning_elsewhere(monkeypatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert precision.autocast_dtype("fp32", "cpu") is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        assert precision.autocast_dtype("bf16", "cpu") is None
    with pytest.raises(ValueError, match="fp16"):
        precision.autocast_dtype("fp16", "cpu")
