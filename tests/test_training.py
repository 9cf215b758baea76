"""fit: loss falls, resume is exact and checked, early stopping restores the best weights, bad configs and nan
losses fail clearly, GPU paths (scaler, autocast, compile keys, TF32) behave, scalars reach TensorBoard."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mfkit.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.loaders import make_loader, pad_collate
from mfkit.optim import fused_adamw_supported, make_optimizer, parameter_groups
from mfkit.timing import MemoryWindow
from mfkit.training import (
    Callback,
    TrainConfig,
    bare_model,
    count_tokens,
    evaluate_loss,
    fit,
    make_accelerator,
    peak_memory,
    read_scalars,
    tf32_matmuls,
)

VOCAB = 40


def counting_rows(n: int = 128, length: int = 16) -> list[dict]:
    """Sequences that count upwards mod VOCAB: trivially learnable next tokens."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
    seqs = (starts + torch.arange(length)) % VOCAB
    return [{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs]


def tiny_gpt() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def train(steps: int = 30, callbacks=(), **overrides):
    seed_everything(0)
    model = tiny_gpt()
    rows = counting_rows()
    loader = make_loader(rows, 16, pad_collate(0), seed=0)
    eval_loader = make_loader(rows[:32], 16, pad_collate(0), shuffle=False)
    config = TrainConfig(
        **{"max_steps": steps, "lr": 3e-3, "log_every": 5, "eval_every": 10, "progress": False, **overrides}
    )
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

    config = TrainConfig(
        max_steps=100, lr=1e-3, eval_every=5, patience=2, monitor="score", mode="max", progress=False
    )
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


# --------------------------------------------------------------------------------------------------------------
# Bad values, non-finite losses, checked resumes (issue 13)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_steps": 2.5}, "max_steps"),
        ({"max_steps": "ten"}, "max_steps"),
        ({"max_steps": True}, "max_steps"),
        ({"max_steps": 10, "lr": float("inf")}, "lr"),
        ({"max_steps": 10, "lr": float("nan")}, "lr"),
        ({"max_steps": 10, "lr": 0}, "lr"),
        ({"max_steps": 10, "min_lr_ratio": 5}, "min_lr_ratio"),
        ({"max_steps": 10, "min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"max_steps": 10, "warmup": 2.5}, "warmup"),
        ({"max_steps": 10, "warmup": -1}, "warmup"),
        ({"max_steps": 10, "grad_accum": 1.5}, "grad_accum"),
        ({"max_steps": 10, "betas": (1.0, 0.999)}, "betas"),
        ({"max_steps": 10, "betas": 0.9}, "betas"),
        ({"max_steps": 10, "eval_every": 0}, "eval_every"),
        ({"max_steps": 10, "grad_clip": float("inf")}, "grad_clip"),
        ({"max_steps": 10, "weight_decay": float("nan")}, "weight_decay"),
        ({"max_steps": 10, "restore_best": "yes"}, "restore_best"),
        ({"max_steps": 10, "log_with": "wandb"}, "log_with"),
        ({"max_steps": 10, "log_with": "tensorboard"}, "logging_dir"),
    ],
)
def test_more_bad_configs_raise_clear_errors(kwargs, fragment):
    with pytest.raises(MfkitError, match=fragment) as err:
        TrainConfig(**kwargs)
    assert "Fix:" in str(err.value)


def nan_after(calls: int):
    """A loss function that turns nan from its `calls`-th call on (as a diverging run would)."""
    seen = {"n": 0}

    def loss_fn(model, batch):
        seen["n"] += 1
        loss = model(**batch).loss
        return loss * float("nan") if seen["n"] >= calls else loss

    return loss_fn


def test_a_nan_loss_stops_fit_within_a_few_steps_and_writes_no_nan_checkpoint(tmp_path):
    seed_everything(0)
    model = tiny_gpt()
    loader = make_loader(counting_rows(), 16, pad_collate(0), seed=0)
    config = TrainConfig(
        max_steps=40, lr=1e-3, log_every=20, progress=False, checkpoint_dir=tmp_path, checkpoint_every=4
    )
    with pytest.raises(MfkitError, match="at step 7 of 40") as err:
        fit(model, loader, config, loss_fn=nan_after(7))
    assert "learning rate" in str(err.value) and "precision" in str(err.value)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 4  # step 8's checkpoint was never written
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_a_huge_learning_rate_is_caught():
    seed_everything(0)
    model = tiny_gpt()
    loader = make_loader(counting_rows(), 16, pad_collate(0), seed=0)
    with pytest.raises(MfkitError, match="finite number") as err:
        fit(model, loader, TrainConfig(max_steps=30, lr=1e6, warmup=0, grad_clip=None, progress=False))
    step = int(str(err.value).split("at step ")[1].split()[0])
    assert step <= 30


def test_resume_under_another_configuration_is_refused_or_starts_fresh(tmp_path):
    train(10, checkpoint_dir=tmp_path, checkpoint_every=5)
    with pytest.raises(MfkitError, match=r"config\.lr: 0\.003 in the checkpoint, 0\.001 now") as err:
        train(10, lr=1e-3, checkpoint_dir=tmp_path)
    assert "resume=False" in str(err.value)
    fresh, history = train(10, lr=1e-3, checkpoint_dir=tmp_path, resume=False)
    reference, _ = train(10, lr=1e-3)
    assert history.resumed_from is None
    for a, b in zip(fresh.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert load_checkpoint(tmp_path / "last.pt")["fingerprint"]["config"]["lr"] == 1e-3  # the new run's now


def test_resume_with_another_model_shape_is_refused(tmp_path):
    seed_everything(0)
    loader = make_loader(counting_rows(), 16, pad_collate(0), seed=0)
    config = TrainConfig(max_steps=4, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    fit(tiny_gpt(), loader, config)
    wider = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=2))
    with pytest.raises(MfkitError, match="shapes: .* differ"):
        fit(wider, loader, config)


def test_resume_from_a_checkpoint_without_fingerprint_is_refused(tmp_path):
    train(5, checkpoint_dir=tmp_path, checkpoint_every=5)
    saved = load_checkpoint(tmp_path / "last.pt")
    del saved["fingerprint"]
    torch.save(saved, tmp_path / "last.pt")
    with pytest.raises(MfkitError, match="older mfkit"):
        train(5, checkpoint_dir=tmp_path)


def test_resumed_history_equals_uninterrupted_when_logging_and_checkpoints_do_not_align(tmp_path):
    """log_every=3 does not divide checkpoint_every=8: the partial logging window travels in the checkpoint."""
    _, reference = train(24, callbacks=[Crash(None)], log_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(24, callbacks=[Crash(13)], log_every=3, checkpoint_dir=tmp_path, checkpoint_every=8)
    assert (
        load_checkpoint(tmp_path / "last.pt")["ranks"][0]["window"]["steps"] == 2
    )  # steps 7 and 8, not yet logged
    _, resumed = train(24, callbacks=[Crash(None)], log_every=3, checkpoint_dir=tmp_path, checkpoint_every=8)
    assert resumed.resumed_from == 8
    keys = ("step", "loss", "lr", "lrs")
    assert [{k: r[k] for k in keys} for r in resumed.train] == [
        {k: r[k] for k in keys} for r in reference.train
    ]
    assert (resumed.tokens, resumed.samples, resumed.steps) == (
        reference.tokens,
        reference.samples,
        reference.steps,
    )
    assert resumed.eval == reference.eval


def test_a_stale_temporary_checkpoint_is_removed_when_a_run_starts(tmp_path):
    stale = tmp_path / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    train(5, checkpoint_dir=tmp_path, checkpoint_every=5)
    assert not stale.exists() and other.exists() and (tmp_path / "last.pt").exists()
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------------------------------------------
# What a GPU run needs, exercised on the CPU (issue 14)


def test_checkpoint_holds_scaler_rng_per_rank_and_logging_window(tmp_path):
    """A GradScaler (fp16's loss scaling; here on the CPU) is saved and restored, so a resumed run's scale is exact."""

    def run(crash_at, checkpoint_dir=None):
        config = TrainConfig(
            max_steps=12,
            lr=3e-3,
            log_every=5,
            progress=False,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=5 if checkpoint_dir else None,
        )
        accelerator = make_accelerator(config)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        seed_everything(0)
        model = tiny_gpt()
        fit(
            model,
            make_loader(counting_rows(), 16, pad_collate(0), seed=0),
            config,
            accelerator=accelerator,
            callbacks=[Crash(crash_at)],
        )
        return model, accelerator.scaler

    reference, ref_scaler = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(7, tmp_path)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 5
    assert (
        saved["scaler"]["scale"] == 2.0**11 and saved["scaler"]["_growth_tracker"] == 2
    )  # grew once at step 3
    assert len(saved["ranks"]) == 1 and set(saved["ranks"][0]) == {"rng", "window"}
    assert set(saved["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    assert saved["ranks"][0]["window"]["steps"] == 0  # step 5 was a log point
    assert "_orig_mod" not in "".join(saved["model"])
    resumed, scaler = run(None, tmp_path)
    assert scaler.state_dict() == ref_scaler.state_dict() and scaler.get_scale() == 2.0**14
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoints_of_a_compiled_model_have_plain_keys():
    model = tiny_gpt()
    accelerator = make_accelerator(TrainConfig(max_steps=1))
    compiled = torch.compile(model, backend="eager")
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert list(bare_model(accelerator, compiled).state_dict()) == list(model.state_dict())


class WatchAutocast(Callback):
    """At every step: is accelerate's autocast wrapper on the model's forward, and in which dtype does its LM head
    compute (bf16 under autocast, fp32 without)?"""

    def __init__(self) -> None:
        self.wrapped: list[bool] = []
        self.head_dtypes: list[torch.dtype] = []

    def on_step_begin(self, state) -> None:
        self.wrapped.append("_original_forward" in bare_model(state.accelerator, state.model).__dict__)

    def hook(self, module, args, output) -> None:
        self.head_dtypes.append(output.dtype)


def test_every_bf16_fit_of_the_same_model_runs_under_autocast_and_leaves_it_fp32(tmp_path):
    """A fresh model, then a second fit of the same object: both must train wrapped in autocast, and after each
    the model must run as it was (fp32, no wrapper, not flagged as prepared), like a reloaded copy."""
    seed_everything(0)
    model = tiny_gpt()
    loader = make_loader(counting_rows(), 16, pad_collate(0), seed=0)
    watch = WatchAutocast()
    hook = model.lm_head.register_forward_hook(watch.hook)
    left_on_the_model = []
    for _ in range(2):
        fit(
            model,
            loader,
            TrainConfig(max_steps=3, lr=1e-3, progress=False, precision="bf16"),
            callbacks=[watch],
        )
        left_on_the_model.append(
            {"forward", "_original_forward", "_is_accelerate_prepared"} & set(model.__dict__)
        )
    hook.remove()
    assert watch.wrapped == [True] * 6
    assert watch.head_dtypes == [torch.bfloat16] * 6
    assert left_on_the_model == [set(), set()]
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    model.eval()
    ids = torch.tensor([r["input_ids"] for r in counting_rows(8)])
    with torch.no_grad():
        logits, again = model(ids).logits, reloaded(ids).logits
    assert logits.dtype == torch.float32
    assert torch.equal(logits, again)


def test_checkpoint_writes_are_left_out_of_the_training_time(tmp_path, monkeypatch):
    import mfkit.training as training

    def slow_save(path, payload):
        time.sleep(1.5)  # a 0.36 GB checkpoint on a slow disk
        return save_checkpoint(path, payload)

    monkeypatch.setattr(training, "save_checkpoint", slow_save)
    _, history = train(6, eval_every=None, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert (tmp_path / "last.pt").exists()
    assert history.seconds < 1.5  # two checkpoints (steps 2 and 4) fall inside the first logging window


def test_token_counts_without_a_mask_are_host_numbers_not_new_device_tensors():
    """A new tensor on a CUDA device is a host-to-device copy, i.e. a sync on every micro-batch."""
    ids = torch.zeros(4, 16, dtype=torch.long)
    counted = count_tokens({"input_ids": ids})
    assert counted == 64 and isinstance(counted, int)
    assert count_tokens({"features": torch.zeros(4, 8)}) == 0
    masked = count_tokens({"input_ids": ids, "attention_mask": torch.ones(4, 16, dtype=torch.long)})
    assert isinstance(masked, torch.Tensor) and int(masked) == 64
    window = torch.zeros((), dtype=torch.long)
    window += counted
    window += masked
    assert int(window) == 128


def test_a_cuda_peak_is_reset_when_a_run_starts_and_counted_above_what_was_in_use(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 300 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1000 * 2**20)
    cuda = torch.device("cuda")
    window = MemoryWindow.start(cuda, collect=False)
    assert calls == [cuda]
    assert peak_memory(cuda, window) == (700.0, "cuda peak above start")
    assert peak_memory(torch.device("cpu"), window)[1] == "process peak RSS"  # the CPU figure is unchanged


def test_only_this_cuda_devices_rng_is_checkpointed_and_an_older_all_devices_state_restores(monkeypatch):
    """A checkpoint written on a 2-GPU machine must resume on a machine with one (simulated CUDA calls)."""
    this_device, other_device = torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)
    restored = []

    def set_all(states):
        if len(states) > 1:
            raise IndexError("list index out of range")  # what torch does with more states than devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": this_device)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [this_device, other_device])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    state = rng_state()
    assert torch.equal(state["cuda"], this_device)
    set_rng_state(state)
    set_rng_state({**state, "cuda": [this_device, other_device]})  # written by an older mfkit on 2 GPUs
    assert [t.tolist() for t in restored] == [this_device.tolist()] * 2


def test_a_step_the_scaler_skips_does_not_advance_the_learning_rate_schedule(monkeypatch):
    """fp16's GradScaler skips the update when gradients overflow; the schedule must then wait too."""
    monkeypatch.setattr(
        "mfkit.optim.fused_adamw_supported", lambda device: False
    )  # a skip torch's scaler makes

    class Overflow(Callback):
        def on_step_begin(self, state) -> None:
            if state.step in (1, 2):  # step 1 overflows (scale inf), step 2 is back to normal
                state.accelerator.scaler.update(float("inf") if state.step == 1 else 2.0**10)

        def on_train_end(self, state) -> None:
            self.schedule_steps = state.scheduler.last_epoch

    config = TrainConfig(max_steps=5, lr=1e-3, progress=False)
    accelerator = make_accelerator(config)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    seed_everything(0)
    overflow = Overflow()
    fit(
        tiny_gpt(),
        make_loader(counting_rows(), 16, pad_collate(0), seed=0),
        config,
        accelerator=accelerator,
        callbacks=[overflow],
    )
    assert overflow.schedule_steps == 4


def test_a_second_fit_may_switch_precision_but_not_under_ddp(monkeypatch):
    from accelerate.state import AcceleratorState

    assert make_accelerator(TrainConfig(max_steps=1, precision="no")).mixed_precision == "no"
    assert make_accelerator(TrainConfig(max_steps=1, precision="bf16")).mixed_precision == "bf16"
    monkeypatch.setitem(AcceleratorState._shared_state, "num_processes", 2)
    with pytest.raises(MfkitError, match="distributed run"):
        make_accelerator(TrainConfig(max_steps=1, precision="no"))


def test_tf32_flags_are_put_back():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_gathered_evaluation_with_one_process_is_the_plain_one():
    seed_everything(0)
    model = tiny_gpt()
    loader = make_loader(counting_rows(n=24), 16, pad_collate(0), shuffle=False)
    accelerator = make_accelerator(TrainConfig(max_steps=1))
    plain = evaluate_loss(model, loader)["eval_loss"]
    assert evaluate_loss(model, loader, accelerator=accelerator)["eval_loss"] == plain


# --------------------------------------------------------------------------------------------------------------
# Experiment tracking (issue 8)


def test_fit_logs_scalars_to_tensorboard_and_they_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    _, history = train(20, log_with="tensorboard", logging_dir=tmp_path, run_name="tiny")
    frame = read_scalars(tmp_path)
    assert set(frame["run"]) == {"tiny"}
    assert {"train/loss", "train/lr", "eval/loss"} <= set(frame["tag"])
    loss = frame[frame["tag"] == "train/loss"]
    assert loss["step"].tolist() == [r["step"] for r in history.train]
    assert loss["value"].tolist() == pytest.approx([r["loss"] for r in history.train], rel=1e-6)
    assert frame[frame["tag"] == "eval/loss"]["value"].tolist() == pytest.approx(
        [e["eval_loss"] for e in history.eval], rel=1e-6
    )


def test_read_scalars_says_when_there_is_nothing(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    with pytest.raises(MfkitError, match="No TensorBoard scalars"):
        read_scalars(tmp_path)


def test_training_runs_without_the_kv_cache_and_puts_the_setting_back():
    """Training never reads a decoder's KV cache: fit switches it off while it trains and restores it after."""
    seen = []

    class Watch(Callback):
        def on_step_begin(self, state) -> None:
            seen.append(bare_model(state.accelerator, state.model).config.use_cache)

    model, _ = train(3, callbacks=[Watch()])
    assert seen == [False, False, False]
    assert model.config.use_cache is True
