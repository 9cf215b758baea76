"""mfkit.continual: the EWC penalty and its gradient, the Fisher estimate, replay batches, the continual metrics,
the DDM drift detector, the prequential loop and the stream learners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from sklearn.linear_model import SGDClassifier
from torch import nn
from torch.nn import functional as F

from mfkit.continual import (
    DDM,
    EWC,
    FrozenAfter,
    OnlineLearner,
    PeriodicRetrain,
    continual_metrics,
    easy_first_order,
    fisher_diagonal,
    fit_passes,
    prequential,
    replay_counts,
    replay_loader,
)
from mfkit.errors import MfkitError
from mfkit.lm import block_collate
from mfkit.loaders import make_loader
from mfkit.training import TrainConfig, fit


def mse_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])


def rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return [{"x": xi, "y": xi.sum()} for xi in x]


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_lambda_f_delta():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    fisher = {name: torch.rand_like(p) for name, p in model.named_parameters()}
    ewc = EWC.from_model(model, fisher, lam=7.0)
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    penalty = ewc.penalty(model)
    penalty.backward()
    for name, p in model.named_parameters():
        expected = 7.0 * fisher[name] * (p.detach() - ewc.anchor[name])
        torch.testing.assert_close(p.grad, expected)
    by_hand = sum(
        0.5 * 7.0 * (fisher[n] * (p.detach() - ewc.anchor[n]) ** 2).sum() for n, p in model.named_parameters()
    )
    torch.testing.assert_close(penalty.detach(), by_hand)


def test_ewc_loss_plugs_into_fit_and_holds_weights_near_the_anchor():
    torch.manual_seed(0)
    old = nn.Linear(3, 1)
    fisher = {name: torch.ones_like(p) for name, p in old.named_parameters()}
    loader = make_loader(rows(64), 16, seed=0)
    moved = {}
    for lam in (0.0, 100.0):
        model = nn.Linear(3, 1)
        model.load_state_dict(old.state_dict())
        ewc = EWC.from_model(model, fisher, lam)
        fit(
            model,
            loader,
            TrainConfig(max_steps=40, lr=0.05, warmup=0, progress=False),
            loss_fn=ewc.loss_fn(mse_loss),
        )
        moved[lam] = sum((p.detach() - ewc.anchor[n]).norm() for n, p in model.named_parameters())
    assert moved[100.0] < 0.2 * moved[0.0]


def test_ewc_penalty_finds_its_anchors_inside_a_compiled_model():
    """fit(compile=True) hands the loss a torch.compile wrapper, whose parameter names start with `_orig_mod.`."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    fisher = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    ewc = EWC.from_model(model, fisher, lam=2.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    compiled = torch.compile(model, backend="eager")
    assert next(n for n, _ in compiled.named_parameters()).startswith("_orig_mod.")
    torch.testing.assert_close(ewc.penalty(compiled), ewc.penalty(model))


def test_fisher_is_the_mean_squared_gradient_of_one_example_batches():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = rows(8)
    loader = make_loader(data, 1, shuffle=False)
    fisher = fisher_diagonal(model, loader, mse_loss)
    expected = torch.zeros_like(model.weight)
    for row in data:  # d/dw (w·x + b − y)² = 2 (w·x + b − y) x
        residual = (model(row["x"]) - row["y"]).detach()
        expected += (2 * residual * row["x"]) ** 2
    torch.testing.assert_close(fisher["weight"], expected / len(data))
    assert model.weight.grad is None  # gradients cleared, weights untouched
    assert fisher_diagonal(model, loader, mse_loss, max_batches=2)["weight"].shape == (1, 3)


def test_ewc_refuses_a_fisher_of_other_parameters():
    with pytest.raises(MfkitError, match="no entry"):
        EWC.from_model(nn.Linear(3, 1), {"weight": torch.ones(1, 3)}, 1.0)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5])
def test_replay_batches_hold_the_asked_share_of_old_rows(share):
    new = Dataset.from_dict({"input_ids": [[1, 1]] * 60, "labels": [[1, 1]] * 60})
    old = Dataset.from_dict({"input_ids": [[2, 2]] * 10, "labels": [[2, 2]] * 10})
    loader = replay_loader(new, old, 12, share, block_collate, seed=0)
    assert len(loader) == 5
    seen_new = 0
    for batch in loader:
        is_old = (batch["input_ids"][:, 0] == 2).float()
        assert len(is_old) - int(is_old.sum()) == 12  # the new-task budget per batch is unchanged
        assert is_old.mean().item() == pytest.approx(share)
        seen_new += 12
    assert seen_new == 60
    assert replay_counts(16, 0.2) == (16, 4)
    with pytest.raises(MfkitError, match="share"):
        replay_counts(16, 1.0)


def test_continual_metrics_signs():
    # task 1's loss rises from 2.0 to 3.0 after training on task 2; task 2's loss ends at 1.0
    scores = continual_metrics([[2.0, 5.0], [3.0, 1.0]])
    assert scores["average_loss"] == pytest.approx(2.0)
    assert scores["forgetting"] == pytest.approx(1.0)  # positive: forgotten
    assert scores["backward_transfer"] == pytest.approx(-1.0)  # negative: task 2 hurt task 1
    three = continual_metrics([[2.0, 9, 9], [1.5, 1.0, 9], [2.5, 1.2, 0.5]])
    assert three["forgetting"] == pytest.approx(
        ((2.5 - 1.5) + (1.2 - 1.0)) / 2
    )  # against the best earlier loss
    assert three["backward_transfer"] == pytest.approx(((2.0 - 2.5) + (1.0 - 1.2)) / 2)
    with pytest.raises(MfkitError, match="square"):
        continual_metrics([[1.0, 2.0]])


def test_ddm_detects_an_abrupt_change_and_stays_quiet_when_stationary():
    rng = np.random.default_rng(2)
    quiet = DDM()
    states = [quiet.update(e) for e in rng.random(3000) < 0.1]
    assert "drift" not in states and quiet.drifts == []
    detector = DDM()
    for e in np.concatenate([rng.random(1000) < 0.1, rng.random(1000) < 0.5]):
        detector.update(e)
    assert detector.drifts and 1000 < detector.drifts[0] < 1100
    # over many streams: false alarms are rare (not impossible), and the change is found within 200 examples
    false_alarms, found = 0, 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        calm = DDM()
        for e in rng.random(2000) < 0.1:
            calm.update(e)
        false_alarms += len(calm.drifts)
        changed = DDM()
        for e in np.concatenate([rng.random(2000) < 0.1, rng.random(400) < 0.5]):
            changed.update(e)
        found += any(2000 < d <= 2200 for d in changed.drifts)
    assert false_alarms <= 6 and found >= 18


class Memorizer:
    """Predicts the label it last learned for an input (or 0); counts what it trained on."""

    def __init__(self) -> None:
        self.table: dict[int, int] = {}
        self.examples_trained = 0

    def predict(self, X):
        return np.array([self.table.get(int(x), 0) for x in X[:, 0]])

    def learn(self, X, y, predicted):
        self.table.update({int(x): int(t) for x, t in zip(X[:, 0], y, strict=True)})
        self.examples_trained += len(y)


def test_prequential_tests_every_example_before_training_on_it():
    X = np.array([[0], [1], [0], [1], [2], [2]])
    y = np.array([1, 1, 1, 1, 1, 0])
    result = prequential(Memorizer(), X, y, batch_size=2)
    # batch 1 unseen -> 0,0; batch 2 seen -> 1,1; batch 3: input 2 unseen at prediction time -> 0,0
    assert result.y_pred.tolist() == [0, 0, 1, 1, 0, 0]
    assert result.examples_trained == 6
    assert result.windowed_f1(2).tolist() == pytest.approx([0.0, 1.0, 0.0])
    with pytest.raises(MfkitError, match="labels"):
        prequential(Memorizer(), X, y[:3], batch_size=2)


def make_sgd() -> SGDClassifier:
    return SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.05, alpha=1e-4, random_state=0)


def drifting_stream(n: int = 1200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two features; the label is x0 > 0 in the first half and x1 > 0 in the second (an abrupt concept drift)."""
    X = np.random.default_rng(seed).normal(size=(n, 2))
    y = np.where(np.arange(n) < n // 2, X[:, 0] > 0, X[:, 1] > 0).astype(int)
    return X, y


def test_stream_learners_react_to_drift_as_designed():
    X, y = drifting_stream()
    online = prequential(OnlineLearner(make_sgd), X, y, 10)
    boosted_learner = OnlineLearner(make_sgd, detector=DDM(), boost=5.0, boost_batches=5)
    boosted = prequential(boosted_learner, X, y, 10)
    frozen = prequential(FrozenAfter(make_sgd, period=300), X, y, 10)
    retrain = prequential(PeriodicRetrain(make_sgd, every=200, epochs=2), X, y, 10)
    late = slice(900, 1200)
    accuracy = {
        k: np.mean(r.y_pred[late] == y[late]) for k, r in {"online": online, "frozen": frozen}.items()
    }
    assert accuracy["frozen"] < 0.7 < accuracy["online"]  # frozen keeps the old concept
    assert boosted.drifts and 600 < boosted.drifts[0] < 800
    assert max(boosted_learner.lr_trace) == pytest.approx(0.25)
    assert frozen.examples_trained == 300
    assert online.examples_trained == 1200
    # online until the first retraining, then every retraining sees all data so far
    assert retrain.examples_trained == 200 + 2 * sum(range(200, 1201, 200))


def test_fit_passes_counts_compute_and_easy_first_order_keeps_the_class_share():
    X, y = drifting_stream(200)
    _, processed, seconds = fit_passes(make_sgd(), X, y, epochs=3, batch_size=16)
    assert processed == 600 and seconds >= 0
    labels = np.array([0] * 60 + [1] * 30)
    groups = np.array(["ham-b"] * 30 + ["ham-a"] * 30 + ["spam-x"] * 30)
    order = easy_first_order(labels, groups, {"ham-a": 0.01, "ham-b": 0.2, "spam-x": 0.1}, seed=0)
    assert sorted(order.tolist()) == list(range(90))
    hams = [groups[i] for i in order if labels[i] == 0]
    assert hams == ["ham-a"] * 30 + ["ham-b"] * 30  # easy group first
    thirds = labels[order].reshape(3, 30).mean(axis=1)
    assert thirds == pytest.approx([1 / 3] * 3, abs=0.04)
    with pytest.raises(MfkitError, match="difficulty"):
        easy_first_order(labels, groups, {"ham-a": 0.0})


def test_block_losses_average_to_token_nll_and_compare_as_a_metric():
    from mfkit.continual import block_losses, mean_loss
    from mfkit.evaluation import compare_methods
    from mfkit.lm import build_tiny_gpt, tiny_gpt_config
    from mfkit.metrics import token_nll

    torch.manual_seed(0)
    model = build_tiny_gpt(tiny_gpt_config(vocab_size=50, block_size=8, n_layer=1, n_embd=16, n_head=2))
    blocks = Dataset.from_dict({"input_ids": torch.randint(50, (12, 8)).tolist()})
    blocks = blocks.add_column("labels", blocks["input_ids"])
    loader = make_loader(blocks, 5, block_collate, shuffle=False)
    losses = block_losses(model, loader)
    total, count = token_nll(model, loader)
    assert losses.shape == (12,)
    assert losses.mean() == pytest.approx(total / count, rel=1e-5)  # equal blocks: the mean is the token mean
    same = compare_methods(np.zeros(12), losses, losses, metric=mean_loss)
    assert same["verdict"] == "no clear difference" and same["difference"] == 0
    assert compare_methods(np.zeros(12), losses + 1.0, losses, metric=mean_loss)["verdict"] == "above"
