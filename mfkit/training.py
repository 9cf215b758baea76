"""`fit`: one explicit, readable training loop on top of `accelerate`.

The loop is what learners read, so every step of an optimizer update is spelled out:

    for each optimizer step:
        for each of `grad_accum` micro-batches:        # gradient accumulation
            loss = loss_fn(model, batch) / grad_accum   # forward (autocast under mixed precision)
            backward(loss)                              # grads add up; DDP syncs only on the last one
        clip_grad_norm_(params, grad_clip)              # bound the update's size
        optimizer.step(); scheduler.step(); zero_grad() # AdamW update, next learning rate
        every `eval_every` steps: evaluate, early-stop, keep the best weights
        every `checkpoint_every` steps: save everything needed to resume exactly

`accelerate` handles the device, mixed precision (with loss scaling for fp16) and multi-process data parallelism,
so the same loop runs on a CPU, one GPU, or under `accelerate launch` on several.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, set_rng_state
from .env import pick_precision
from .errors import MfkitError, check_choice, check_positive
from .optim import SCHEDULES, make_optimizer, make_scheduler, parameter_groups, warmup_steps_of

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module, DataLoader], dict[str, float]]


@dataclass
class TrainConfig:
    """Everything `fit` needs to know besides the model and the data."""

    max_steps: int
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.06  # < 1: fraction of max_steps; >= 1: steps
    schedule: str = "linear"  # constant | linear | cosine | slanted
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    precision: str = "auto"  # auto | no | bf16 | fp16
    eval_every: int | None = None
    log_every: int = 10
    patience: int | None = None  # evaluations without improvement before stopping early
    monitor: str = "eval_loss"
    mode: str = "min"  # min | max
    restore_best: bool = True
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int | None = None
    resume: bool = True
    progress: bool = True
    cpu: bool = False  # force the CPU even where a GPU is present
    compile: bool = False  # torch.compile (inductor): faster steps after the first ones, which pay for compiling
    gradient_checkpointing: bool = False  # recompute activations during backward: less memory, ~30% more compute

    def __post_init__(self) -> None:
        check_positive("max_steps", self.max_steps)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("grad_accum", self.grad_accum)
        check_positive("log_every", self.log_every)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, ("auto", "no", "bf16", "fp16"))
        check_choice("mode", self.mode, ("min", "max"))
        for name in ("eval_every", "patience", "checkpoint_every", "grad_clip"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if self.patience is not None and self.eval_every is None:
            raise MfkitError("patience is set but eval_every is not.", "set eval_every so there is something to early-stop on.")


@dataclass
class History:
    """What happened during `fit`: logged training points, evaluations, and summary figures."""

    train: list[dict[str, float]] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    samples: int = 0
    peak_memory_mb: float = 0.0
    memory_kind: str = ""
    resumed_from: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    def frame(self, which: str = "train"):
        """The training log or the evaluations as a pandas DataFrame."""
        import pandas as pd

        check_choice("which", which, ("train", "eval"))
        return pd.DataFrame(getattr(self, which))


@dataclass
class TrainState:
    """What callbacks see and may change (e.g. set `should_stop`, unfreeze layers of `model`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator
    config: TrainConfig
    history: History
    step: int = 0
    should_stop: bool = False


class Callback:
    """Hooks into `fit`. Subclasses override what they need; state they keep must go through state_dict."""

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_step_begin(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_evaluate(self, state: TrainState, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss a transformers model computes itself when the batch carries `labels`."""
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise MfkitError("The model returned no loss.", "put `labels` in the batch, or pass loss_fn= to fit().")
    return out.loss


def count_tokens(batch: Batch) -> torch.Tensor:
    """Real (non-padding) tokens in a batch, as a device tensor (no host sync)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    if "input_ids" in batch:
        return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
    return torch.zeros((), dtype=torch.long)


def batch_rows(batch: Batch) -> int:
    """Number of examples in a batch."""
    return len(next(iter(batch.values())))


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, loader: DataLoader, loss_fn: LossFn = default_loss, accelerator: Accelerator | None = None
) -> dict[str, float]:
    """Mean loss over `loader`, each batch weighted by its number of examples (summed across processes)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    rows = torch.zeros((), dtype=torch.float64)
    for batch in loader:
        loss = loss_fn(model, batch).detach().double().cpu()
        total += loss * batch_rows(batch)
        rows += batch_rows(batch)
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        total, rows = (accelerator.reduce(t.to(accelerator.device), "sum").cpu() for t in (total, rows))
    if rows == 0:
        raise MfkitError("The evaluation loader is empty.", "give fit() a non-empty eval dataset.")
    return {"eval_loss": float(total / rows)}


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MB: allocated by tensors on CUDA, else the whole process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


def _batches(loader: DataLoader, accelerator: Accelerator, consumed: int) -> Iterator[Batch]:
    """Endless batches, starting after `consumed` micro-batches; epoch e's order depends only on (seed, e)."""
    per_epoch = len(loader)
    if per_epoch == 0:
        raise MfkitError("The training loader yields no batches.", "check the dataset is not empty and batch_size fits.")
    epoch, skip = divmod(consumed, per_epoch)
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for `config`: 'auto' precision is bf16/fp16 on CUDA, fp32 elsewhere."""
    cpu = config.cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    precision = config.precision
    if precision == "auto":
        precision = "no" if cpu else pick_precision("cuda" if torch.cuda.is_available() else "mps")
    if torch.cuda.is_available() and not cpu:
        # fp32 matmuls (those autocast leaves in fp32) may use TF32 tensor cores on Ampere+: ~10 bits of mantissa,
        # fast, and well within what training noise tolerates.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        mixed_precision=precision,
        cpu=cpu,
        dynamo_backend="inductor" if config.compile else "no",
        # Host-to-device copies overlap with compute when the loader pins memory (make_loader does on CUDA).
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available() and not cpu),
    )


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig,
    *,
    eval_loader: DataLoader | None = None,
    loss_fn: LossFn = default_loss,
    eval_fn: EvalFn | None = None,
    param_groups: list[dict] | None = None,
    callbacks: Sequence[Callback] = (),
    accelerator: Accelerator | None = None,
) -> History:
    """Train `model` for `config.max_steps` optimizer steps and return its `History`.

    `loss_fn(model, batch)` returns the scalar loss (default: the model's own `labels` loss); `eval_fn(model,
    loader)` returns a dict of metrics (default: mean `eval_loss`); `param_groups` overrides the default AdamW groups
    (e.g. layer-wise learning rates). The model is trained in place; with `restore_best` and evaluation, it ends
    holding the weights of its best evaluation.
    """
    accelerator = accelerator or make_accelerator(config)
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise MfkitError(f"{type(model).__name__} has no gradient checkpointing.", "use a transformers model, or turn it off.")
        model.gradient_checkpointing_enable()
    groups = param_groups or parameter_groups(model, config.weight_decay, config.lr)
    optimizer = make_optimizer(groups, config.lr, config.betas, accelerator.device)
    scheduler = make_scheduler(
        optimizer, config.max_steps, warmup_steps_of(config.warmup, config.max_steps), config.schedule, config.min_lr_ratio
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    history = History()
    state = TrainState(model, optimizer, scheduler, accelerator, config, history)
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals = 0

    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    if ckpt_path is not None and config.resume and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        accelerator.unwrap_model(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if len(saved["callbacks"]) != len(callbacks):
            raise MfkitError(
                f"{ckpt_path} was written with {len(saved['callbacks'])} callback(s); fit() got {len(callbacks)}.",
                "resume with the same callbacks, or pass resume=False (or a new checkpoint_dir) to start over.",
            )
        for cb, cb_state in zip(callbacks, saved["callbacks"], strict=True):
            cb.load_state_dict(cb_state)
        state.history = history = History(**saved["history"])
        state.step, best_state, bad_evals = saved["step"], saved["best_state"], saved["bad_evals"]
        history.resumed_from = state.step
        state.should_stop = history.stopped_early
        set_rng_state(saved["rng"])

    def evaluate() -> dict[str, float]:
        metrics = eval_fn(model, eval_loader) if eval_fn else evaluate_loss(model, eval_loader, loss_fn, accelerator)
        model.train()
        return metrics

    def checkpoint() -> None:
        if ckpt_path is None or not accelerator.is_main_process:
            return
        save_checkpoint(ckpt_path, {
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": state.step,
            "config": dataclasses.asdict(config),
            "history": dataclasses.asdict(history),
            "callbacks": [cb.state_dict() for cb in callbacks],
            "best_state": best_state,
            "bad_evals": bad_evals,
        })

    for cb in callbacks:
        cb.on_train_begin(state)
    model.train()
    batches = _batches(train_loader, accelerator, state.step * config.grad_accum)
    window_loss = torch.zeros((), device=accelerator.device)
    window_tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
    window_samples, window_steps = 0, 0
    window_start = time.perf_counter()
    run_seconds = 0.0
    bar = tqdm(total=config.max_steps, initial=state.step, desc="fit", disable=not (config.progress and accelerator.is_local_main_process))

    while state.step < config.max_steps and not state.should_stop:
        for cb in callbacks:
            cb.on_step_begin(state)
        for micro in range(config.grad_accum):
            batch = next(batches)
            last = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss / config.grad_accum)
            window_loss += loss.detach() / config.grad_accum
            window_tokens += count_tokens(batch).to(window_tokens.device)
            window_samples += batch_rows(batch)
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window_steps += 1
        bar.update(1)

        if state.step % config.log_every == 0 or state.step == config.max_steps:
            loss_value = accelerator.reduce(window_loss, "mean").item() / window_steps  # the one host sync
            tokens = int(accelerator.reduce(window_tokens, "sum").item())
            samples = window_samples * accelerator.num_processes
            elapsed = time.perf_counter() - window_start
            run_seconds += elapsed
            history.tokens += tokens
            history.samples += samples
            history.train.append({
                "step": state.step,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "lrs": list(scheduler.get_last_lr()),
                "tokens_per_s": tokens / elapsed,
                "samples_per_s": samples / elapsed,
            })
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            window_loss.zero_()
            window_tokens.zero_()
            window_samples, window_steps = 0, 0
            window_start = time.perf_counter()

        if eval_loader is not None and config.eval_every and (state.step % config.eval_every == 0 or state.step == config.max_steps):
            eval_start = time.perf_counter()
            metrics = evaluate()
            history.eval.append({"step": state.step, **metrics})
            if config.monitor not in metrics:
                raise MfkitError(f"monitor={config.monitor!r} is not among the metrics {sorted(metrics)}.", "set TrainConfig.monitor to one of them.")
            value = metrics[config.monitor]
            if _improved(value, history.best_metric, config.mode):
                history.best_step, history.best_metric, bad_evals = state.step, value, 0
                if config.restore_best:
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in accelerator.unwrap_model(model).state_dict().items()}
            else:
                bad_evals += 1
                if config.patience is not None and bad_evals >= config.patience:
                    state.should_stop = history.stopped_early = True
            for cb in callbacks:
                cb.on_evaluate(state, metrics)
            window_start += time.perf_counter() - eval_start  # evaluation time is not training throughput

        for cb in callbacks:
            cb.on_step_end(state)
        if config.checkpoint_every and state.step % config.checkpoint_every == 0:
            checkpoint()

    bar.close()
    if window_steps:  # a run stopped early between two log points
        run_seconds += time.perf_counter() - window_start
        history.tokens += int(accelerator.reduce(window_tokens, "sum").item())
        history.samples += window_samples * accelerator.num_processes
    history.steps = state.step
    history.seconds += run_seconds
    history.peak_memory_mb, history.memory_kind = peak_memory(accelerator.device)
    checkpoint()
    if config.restore_best and best_state is not None:
        accelerator.unwrap_model(model).load_state_dict(best_state)
    for cb in callbacks:
        cb.on_train_end(state)
    return history
