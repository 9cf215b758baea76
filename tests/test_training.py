"""fit: loss falls, resume is exact, early stopping restores the best weights, bad configs fail clearly."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.loaders import make_loader, pad_collate
from mfkit.optim import fused_adamw_supported, make_optimizer, parameter_groups
from mfkit.training import Callback, TrainConfig, evaluate_loss, fit

VOCAB = 40


def counting_rows(n: int = 128, length: int = 16) -> list[dict]:
    """Sequences that count upwards mod VOCAB: trivially learnable next tokens."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
    seqs = (starts + torch.arange(length)) % VOCAB
    return [{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs]


def tiny_gpt() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def train(steps: int = 30, callbacks=(), **overrides):
    seed_everything(0)
    model = tiny_gpt()
    rows = counting_rows()
    loader = make_loader(rows, 16, pad_collate(0), seed=0)
    eval_loader = make_loader(rows[:32], 16, pad_collate(0), shuffle=False)
    config = TrainConfig(**{"max_steps": steps, "lr": 3e-3, "log_every": 5, "eval_every": 10, "progress": False, **overrides})
    return model, fit(model, loader, config, eval_loader=eval_loader, callbacks=list(callbacks))


def test_loss_falls_and_history_is_filled():
    model, history = train(30)
    losses = [row["loss"] for row in history.train]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0]
    assert [e["step"] for e in history.eval] == [10, 20, 30]
    assert history.eval[-1]["eval_loss"] < history.eval[0]["eval_loss"]
    assert history.steps == 30 and history.tokens == 30 * 16 * 16 and history.samples == 30 * 16
    assert history.tokens_per_s > 0 and history.peak_memory_mb > 0


class Crash(Callback):
    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_begin(self, state) -> None:
        if self.at is not None and state.step == self.at:
            raise KeyboardInterrupt


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    reference, ref_history = train(40, callbacks=[Crash(None)])
    with pytest.raises(KeyboardInterrupt):
        train(40, callbacks=[Crash(25)], checkpoint_dir=tmp_path, checkpoint_every=10)
    assert (tmp_path / "last.pt").exists()
    resumed, history = train(40, callbacks=[Crash(None)], checkpoint_dir=tmp_path, checkpoint_every=10)
    assert history.resumed_from == 20
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [e["eval_loss"] for e in history.eval] == [e["eval_loss"] for e in ref_history.eval]


def test_gradient_accumulation_matches_a_bigger_batch():
    """Two micro-batches of 8 (dropout off) give the same update as one batch of 16."""
    def run(batch: int, accum: int) -> GPT2LMHeadModel:
        seed_everything(0)
        model = tiny_gpt()
        model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        loader = make_loader(counting_rows(), batch, pad_collate(0), seed=0)
        fit(model, loader, TrainConfig(max_steps=3, lr=1e-3, grad_accum=accum, progress=False, warmup=0))
        return model

    big, small = run(16, 1), run(8, 2)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_early_stopping_restores_best_weights():
    class Worsen(Callback):
        """Report a metric that gets worse after the first evaluation."""

    seed_everything(0)
    model = tiny_gpt()
    rows = counting_rows()
    loader = make_loader(rows, 16, pad_collate(0), seed=0)
    eval_loader = make_loader(rows[:16], 16, pad_collate(0), shuffle=False)
    calls = {"n": 0}
    snapshots = []

    def eval_fn(m, _loader):
        calls["n"] += 1
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"score": 1.0 / calls["n"]}  # best at the first evaluation, worse afterwards

    config = TrainConfig(max_steps=100, lr=1e-3, eval_every=5, patience=2, monitor="score", mode="max", progress=False)
    history = fit(model, loader, config, eval_loader=eval_loader, eval_fn=eval_fn)
    assert history.stopped_early and history.steps == 15 and history.best_step == 5
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[0][name]), name


def test_evaluate_loss_weights_batches_by_rows():
    seed_everything(0)
    model = tiny_gpt()
    rows = counting_rows(n=24)
    whole = evaluate_loss(model, make_loader(rows, 24, pad_collate(0), shuffle=False))["eval_loss"]
    split = evaluate_loss(model, make_loader(rows, 16, pad_collate(0), shuffle=False))["eval_loss"]
    assert split == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": 10, "lr": -1}, "lr"),
        ({"max_steps": 10, "schedule": "triangle"}, "schedule"),
        ({"max_steps": 10, "precision": "fp8"}, "precision"),
        ({"max_steps": 10, "patience": 2}, "eval_every"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, fragment):
    with pytest.raises(MfkitError, match=fragment) as err:
        TrainConfig(**kwargs)
    assert "Fix:" in str(err.value)


def test_resume_with_other_callbacks_is_refused(tmp_path):
    train(10, checkpoint_dir=tmp_path, checkpoint_every=10)
    with pytest.raises(MfkitError, match="callback"):
        train(20, callbacks=[Crash(None)], checkpoint_dir=tmp_path)


def final_weights(**overrides) -> list[torch.Tensor]:
    model, _ = train(10, eval_every=None, **overrides)
    return [p.detach().clone() for p in model.parameters()]


def test_gradient_checkpointing_changes_memory_not_results():
    for plain, checkpointed in zip(final_weights(), final_weights(gradient_checkpointing=True), strict=True):
        torch.testing.assert_close(plain, checkpointed, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one():
    for eager, compiled in zip(final_weights(), final_weights(compile=True), strict=True):
        torch.testing.assert_close(eager, compiled, rtol=1e-3, atol=1e-4)


def test_fused_adamw_on_cpu_matches_foreach():
    """The fused kernel make_optimizer picks on the CPU takes the same steps as the multi-tensor one, up to rounding."""
    cpu = torch.device("cpu")
    if not fused_adamw_supported(cpu):
        pytest.skip("this torch has no fused AdamW for the CPU")
    seed_everything(0)
    start = tiny_gpt().state_dict()
    batch = torch.tensor([r["input_ids"] for r in counting_rows(8)])
    weights = {}
    for kernel in ("fused", "foreach"):
        model = tiny_gpt()
        model.load_state_dict(start)
        groups = parameter_groups(model, 0.01, 1e-3)
        if kernel == "fused":
            optimizer = make_optimizer(groups, 1e-3, (0.9, 0.999), cpu)
            assert optimizer.defaults["fused"] is True
        else:
            groups = [{k: v for k, v in g.items() if k not in ("names", "layer")} for g in groups]
            optimizer = torch.optim.AdamW(groups, lr=1e-3, foreach=True)
        seed_everything(1)  # the same dropout masks in both runs
        for _ in range(10):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[kernel] = model.state_dict()
    moved = max((weights["fused"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    for name in start:
        torch.testing.assert_close(weights["fused"][name], weights["foreach"][name], rtol=1e-4, atol=1e-5)
