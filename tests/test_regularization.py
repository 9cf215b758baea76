"""The regularizers of notebook 10: label smoothing, L1 as a loss and as a proximal step, and their strengths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mfkit import regularization as reg
from mfkit.errors import MfkitError
from mfkit.training import TrainConfig, fit


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.linear(x)
        out = type("Out", (), {})()
        out.logits = logits
        out.loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return out


def test_l1_and_label_smoothing_losses():
    torch.manual_seed(0)
    model = Tiny()
    batch = {"x": torch.randn(8, 4), "labels": torch.randint(0, 2, (8,))}
    with torch.no_grad():
        plain = model(**batch).loss
        l1 = reg.with_l1(0.5)(model, batch)
        smooth = reg.label_smoothing_loss(0.2)(model, batch)
        smooth_zero = reg.label_smoothing_loss(0.0)(model, batch)
        logp = torch.log_softmax(model(batch["x"]).logits, -1)
    assert float(l1 - plain) == pytest.approx(0.5 * float(model.linear.weight.detach().abs().sum()), rel=1e-5)
    assert float(smooth_zero) == pytest.approx(float(plain), rel=1e-6)
    target = torch.full((8, 2), 0.1)  # (1 - 0.2) * onehot + 0.2 / 2
    target[torch.arange(8), batch["labels"]] = 0.9
    assert float(smooth) == pytest.approx(float(-(target * logp).sum(-1).mean()), rel=1e-6)
    assert reg.decayed_weights(model) == [model.linear.weight]
    with pytest.raises(MfkitError, match="smoothing"):
        reg.label_smoothing_loss(1.0)


def test_soft_threshold_is_the_l1_proximal_operator():
    w = torch.tensor([-0.3, -0.05, 0.0, 0.02, 0.5])
    assert reg.soft_threshold(w.clone(), 0.1).tolist() == pytest.approx([-0.2, 0.0, 0.0, 0.0, 0.4])


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    rows = [{"x": x[i], "labels": int(x[i, 0] > 0)} for i in range(n)]
    return DataLoader(rows, batch_size=8, shuffle=False)


def test_proximal_l1_gives_exact_zeros_and_leaves_biases_alone():
    torch.manual_seed(0)
    model = Tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(
        max_steps=20, lr=0.05, weight_decay=0.0, warmup=0, schedule="constant", progress=False
    )
    fit(model, _loader(), config, callbacks=[reg.ProximalL1(1.0)])
    report = reg.weight_report(model, start)
    # 20 steps of 0.05 thresholds by 1.0 in all, far above any |w| at the start
    assert report["zero_share"] > 0.5
    assert report["norm_ratio"] < 1
    assert torch.count_nonzero(model.linear.bias) == 2


def test_proximal_l1_is_applied_before_each_evaluation_and_removed_after():
    torch.manual_seed(0)
    model = Tiny()
    seen = []

    def zeros(net, loader):
        seen.append(int((net.linear.weight == 0).sum()))
        return {"eval_loss": 0.0}

    prox = reg.ProximalL1(100.0)  # one step thresholds every weight to 0
    config = TrainConfig(max_steps=2, lr=0.05, weight_decay=0.0, warmup=0, eval_every=1, progress=False)
    fit(model, _loader(), config, eval_loader=_loader(), eval_fn=zeros, callbacks=[prox])
    assert seen == [8, 8] and prox._handle is None


def test_proximal_l1_of_zero_is_plain_training():
    def trained(callbacks):
        torch.manual_seed(0)
        model = Tiny()
        config = TrainConfig(max_steps=5, lr=0.05, weight_decay=0.0, warmup=0, progress=False)
        fit(model, _loader(), config, callbacks=callbacks)
        return model.linear.weight.detach().clone()

    assert torch.equal(trained([]), trained([reg.ProximalL1(0.0)]))


def test_lr_sum_follows_the_schedule():
    assert reg.lr_sum(10, 0.1, warmup=0, schedule="constant") == pytest.approx(1.0)
    # linear decay from the peak to 0 over S steps: about half of eta * S
    assert reg.lr_sum(1000, 1e-4, warmup=0.1, schedule="linear") == pytest.approx(0.05, rel=0.01)
    with pytest.raises(MfkitError):
        reg.lr_sum(10, 0.0)


def test_cross_entropy_of_positive():
    labels = np.array([1, 0, 1, 0])
    probs = np.array([0.9, 0.2, 0.6, 0.5])
    expected = -np.mean([math.log(0.9), math.log(0.8), math.log(0.6), math.log(0.5)])
    assert reg.cross_entropy_of_positive(labels, probs) == pytest.approx(expected)
    assert math.isfinite(reg.cross_entropy_of_positive(labels, np.array([0.0, 1.0, 0.0, 1.0])))
    with pytest.raises(MfkitError):
        reg.cross_entropy_of_positive(labels, probs[:3])
