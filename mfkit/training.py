"""`fit`: one explicit, readable training loop on top of `accelerate`.

The loop is what learners read, so every step of an optimizer update is spelled out:

    for each optimizer step:
        for each of `grad_accum` micro-batches:        # gradient accumulation
            loss = loss_fn(model, batch) / grad_accum   # forward (autocast under mixed precision)
            backward(loss)                              # grads add up; DDP syncs only on the last one
        clip_grad_norm_(params, grad_clip)              # bound the update's size
        optimizer.step(); scheduler.step(); zero_grad() # AdamW update, next learning rate
        every few steps: stop with an error if the loss stopped being a finite number
        every `eval_every` steps: evaluate, early-stop, keep the best weights
        every `checkpoint_every` steps: save everything needed to resume exactly

`accelerate` handles the device, mixed precision (with loss scaling for fp16) and multi-process data parallelism,
so the same loop runs on a CPU, one GPU, or under `accelerate launch` on several. Under several processes every
evaluation is gathered over all of them, so every process takes the same early-stopping decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, gather_object
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import (
    CHECKPOINT_NAME,
    check_fingerprint,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .env import pick_precision
from .errors import MfkitError, check_choice
from .metrics import gather_rows, gathering_with
from .optim import SCHEDULES, make_optimizer, make_scheduler, parameter_groups, warmup_steps_of
from .timing import MemoryWindow

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module, DataLoader], dict[str, float]]

TRACKERS = ("tensorboard",)
NONFINITE_CHECK_EVERY = 5  # steps between checks that the loss is still a finite number (one host sync each)
# Settings that do not change what a run computes: a checkpoint written under other values of these may be resumed.
NOT_FINGERPRINTED = (
    "log_every",
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
    "progress",
    "cpu",
    "compile",
    "gradient_checkpointing",
    "log_with",
    "logging_dir",
    "run_name",
)


def _check_count(name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    """Raise `MfkitError` unless `value` is a whole number >= `minimum` (or None, when optional)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise MfkitError(
            f"{name}={value!r} must be a whole number of at least {minimum}.",
            f"pass {name} as an int >= {minimum}" + (", or None." if optional else "."),
        )


def _check_number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """Raise `MfkitError` unless `value` is a finite number in [low, high] ((low, high] when `low_open`)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        span = (
            f"{'(' if low_open else '['}{low}, {high}]"
            if math.isfinite(high)
            else (f"greater than {low}" if low_open else f"at least {low}")
        )
        raise MfkitError(
            f"{name}={value!r} must be a finite number {'in ' if math.isfinite(high) else ''}{span}.",
            f"pass {name} as a number {'in ' if math.isfinite(high) else ''}{span}.",
        )


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
    resume: bool = True  # False: start afresh even when checkpoint_dir holds a checkpoint (it is overwritten)
    progress: bool = True
    cpu: bool = False  # force the CPU even where a GPU is present
    # torch.compile (inductor): faster steps after the first ones, which pay for compiling
    compile: bool = False
    # recompute activations during backward: less memory, ~30% more compute
    gradient_checkpointing: bool = False
    log_with: str | None = None  # "tensorboard": also log train/eval scalars to event files under logging_dir
    logging_dir: str | Path | None = None
    run_name: str = "fit"  # the tracker's run (a subfolder of logging_dir)

    def __post_init__(self) -> None:
        _check_count("max_steps", self.max_steps)
        _check_number("lr", self.lr, 0.0, low_open=True)
        _check_number("weight_decay", self.weight_decay, 0.0)
        _check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_number("warmup", self.warmup, 0.0)
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise MfkitError(
                f"warmup={self.warmup!r} is neither a fraction below 1 nor a whole number of steps.",
                "pass a fraction of max_steps in [0, 1) or a number of steps such as 100.",
            )
        if not (isinstance(self.betas, tuple | list) and len(self.betas) == 2):
            raise MfkitError(
                f"betas={self.betas!r} is not a pair.", "pass two numbers in [0, 1), e.g. (0.9, 0.999)."
            )
        for i, beta in enumerate(self.betas):
            _check_number(f"betas[{i}]", beta, 0.0, 0.999999)
        _check_count("grad_accum", self.grad_accum)
        _check_count("log_every", self.log_every)
        for name in ("eval_every", "patience", "checkpoint_every"):
            _check_count(name, getattr(self, name), optional=True)
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, 0.0, low_open=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, ("auto", "no", "bf16", "fp16"))
        check_choice("mode", self.mode, ("min", "max"))
        for name in ("restore_best", "resume", "progress", "cpu", "compile", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise MfkitError(
                    f"{name}={getattr(self, name)!r} is not True or False.", f"pass {name}=True or False."
                )
        if not isinstance(self.monitor, str) or not self.monitor:
            raise MfkitError(
                f"monitor={self.monitor!r} is not a metric name.",
                "pass the name of a metric, e.g. 'eval_loss'.",
            )
        if self.patience is not None and self.eval_every is None:
            raise MfkitError(
                "patience is set but eval_every is not.",
                "set eval_every so there is something to early-stop on.",
            )
        if self.log_with is not None:
            check_choice("log_with", self.log_with, TRACKERS)
            if self.logging_dir is None:
                raise MfkitError(
                    f"log_with={self.log_with!r} needs a folder for its files.",
                    "pass logging_dir=, e.g. ARTIFACTS_DIR / 'runs'.",
                )

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape what a run computes (a resumed run must have the same)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}


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
    # CUDA: this fit's peak of tensor memory above what was in use when it began; else the process's peak RSS
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
        raise MfkitError(
            "The model returned no loss.", "put `labels` in the batch, or pass loss_fn= to fit()."
        )
    return out.loss


def count_tokens(batch: Batch) -> torch.Tensor | int:
    """Real (non-padding) tokens in a batch, without a host sync.

    With an attention mask: its sum, a tensor on the batch's device. Without one, every position counts, and the
    count is known on the host: a Python int, which adds to a device tensor without a copy (a new tensor on the
    device would be a host-to-device copy, i.e. one sync per micro-batch).
    """
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    return 0


def batch_rows(batch: Batch) -> int:
    """Number of examples in a batch."""
    return len(next(iter(batch.values())))


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn = default_loss,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Mean loss over `loader`, each batch weighted by its number of examples.

    Under several processes the batch losses of all of them are gathered (`metrics.gather_rows`), so every process
    gets the mean over the whole loader. (Where accelerate repeats a few examples to even out the last batches,
    their rows are dropped, but the loss of that last batch, a mean the loss function already took, still counts
    them: a difference of a fraction of one batch.)
    """
    was_training = model.training
    model.eval()
    per_row = []
    for batch in loader:
        loss = loss_fn(model, batch).detach().float()
        per_row.append(gather_rows(loss.reshape(1).repeat(batch_rows(batch)), loader, accelerator).double())
    model.train(was_training)
    if not per_row:
        raise MfkitError("The evaluation loader is empty.", "give fit() a non-empty eval dataset.")
    return {"eval_loss": float(torch.cat(per_row).mean())}


def peak_memory(device: torch.device, since: MemoryWindow | None = None) -> tuple[float, str]:
    """Peak memory in MB: allocated by tensors on CUDA, else the whole process's peak resident set.

    On CUDA with `since` (a `timing.MemoryWindow` opened when the work began), the peak since then above what was
    in use at that moment; without it, the peak since the process started (or the last reset).
    """
    if device.type == "cuda":
        if since is not None:
            return since.peak_mb(), since.kind
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


def _batches(loader: DataLoader, accelerator: Accelerator, consumed: int) -> Iterator[Batch]:
    """Endless batches, starting after `consumed` micro-batches; epoch e's order depends only on (seed, e)."""
    per_epoch = len(loader)
    if per_epoch == 0:
        raise MfkitError(
            "The training loader yields no batches.", "check the dataset is not empty and batch_size fits."
        )
    epoch, skip = divmod(consumed, per_epoch)
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


# --------------------------------------------------------------------------------------------------------------
# The accelerator, and what fit leaves behind


def _gpu_present() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _reconcile_accelerate_state(precision: str, cpu: bool) -> None:
    """Let a second `fit` in the same process use another precision or device.

    accelerate keeps one process-wide state and refuses (or, for cpu=False after cpu=True, silently ignores) a new
    precision or device. In a single process nothing else depends on that state between two `fit` calls, so it is
    reset; in a distributed run it cannot be, and the error says what to do.
    """
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state
    if not shared:
        return
    device = shared.get("device")
    device_changes = device is not None and (
        (cpu and device.type != "cpu") or (not cpu and device.type == "cpu" and _gpu_present())
    )
    precision_changes = shared.get("_mixed_precision", precision) != precision
    if not (device_changes or precision_changes):
        return
    if shared.get("num_processes", 1) > 1:
        raise MfkitError(
            f"This distributed run already uses precision {shared.get('_mixed_precision')!r} on {device}; "
            f"a fit with precision {precision!r}{' on the CPU' if cpu else ''} cannot switch it.",
            "use the same precision and cpu settings in every fit of a distributed run.",
        )
    AcceleratorState._reset_state(reset_partial_state=device_changes)
    if device_changes:
        PartialState._reset_state()


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for `config`: 'auto' precision is bf16/fp16 on CUDA, fp32 elsewhere."""
    cpu = config.cpu or not _gpu_present()
    precision = config.precision
    if precision == "auto":
        precision = "no" if cpu else pick_precision("cuda" if torch.cuda.is_available() else "mps")
    _reconcile_accelerate_state(precision, cpu)
    return Accelerator(
        mixed_precision=precision,
        cpu=cpu,
        dynamo_backend="inductor" if config.compile else "no",
        # Host-to-device copies overlap with compute when the loader pins memory (make_loader does on CUDA).
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available() and not cpu),
        log_with=config.log_with,
        project_dir=str(config.logging_dir) if config.logging_dir is not None else None,
    )


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Allow TF32 tensor cores for fp32 matmuls inside the block only (Ampere and newer GPUs).

    fp32 matmuls (those autocast leaves in fp32) then run with ~10 bits of mantissa: fast, and well within what
    training noise tolerates. The flags are process-wide, so they are put back afterwards: an fp32 comparison
    after training (a merge check, a reloaded model) runs in true fp32 again.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Switch off a decoder's KV cache inside the block (training never reuses it) and put the setting back.

    With `use_cache` on, every training forward of a decoder builds and keeps a cache of each layer's keys and
    values that no later step reads; `generate` after training wants it on again.
    """
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if saved is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if saved is not None:
            config.use_cache = saved


def bare_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The caller's module inside accelerate's wrappers (DDP, torch.compile): its state_dict keys carry no
    `module.` or `_orig_mod.` prefix, so a checkpoint of it loads with or without compiling."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def release_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """Remove the autocast wrapper accelerate put on the model's `forward`; return the caller's plain module.

    Under mixed precision `accelerator.prepare` replaces `model.forward` by an autocast version (keeping the
    original as `_original_forward`), and it flags the model as prepared. Left in place, the model would keep
    running in fp16/bf16 after training while a reloaded copy runs in fp32. (accelerate's own unwrapping follows `__wrapped__` to the innermost
    function, past transformers' decorators of `forward`; this puts back exactly what was there.)
    """
    plain = bare_model(accelerator, model)
    # accelerate marks what it prepared and returns a marked model untouched from the next `prepare`: a second
    # fit would then run without autocast and without moving the model to the device.
    plain.__dict__.pop("_is_accelerate_prepared", None)
    original = plain.__dict__.pop("_original_forward", None)
    if original is not None:
        if getattr(original, "__func__", None) is type(plain).forward:
            plain.__dict__.pop("forward", None)  # the class's own method again, as before fit
        else:
            plain.forward = original
    return plain


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward: transformers 5's `activation_checkpointing_enable` (non-reentrant),
    or the older `gradient_checkpointing_enable` where a model only has that."""
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        method = getattr(model, name, None)
        if callable(method):
            method()
            return
    raise MfkitError(
        f"{type(model).__name__} has no gradient checkpointing.", "use a transformers model, or turn it off."
    )


def run_fingerprint(
    config: TrainConfig,
    model: nn.Module,
    groups: Sequence[dict],
    callbacks: Sequence[Callback],
    processes: int,
) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run: settings, tensor shapes, optimizer groups,
    callbacks and the number of processes."""
    return {
        "config": config.fingerprint(),
        "shapes": {name: [list(t.shape), str(t.dtype)] for name, t in model.state_dict().items()},
        "optimizer_groups": [[len(g["params"]), g["lr"], g["weight_decay"]] for g in groups],
        "callbacks": [type(cb).__name__ for cb in callbacks],
        "processes": processes,
    }


def _nonfinite_error(step: int, config: TrainConfig, what: str = "loss") -> MfkitError:
    return MfkitError(
        f"The training {what} stopped being a finite number (nan or inf) at step {step} of {config.max_steps}; "
        "training stopped there, and no checkpoint of these weights was written.",
        f"lower the learning rate (lr={config.lr:g}); under fp16 mixed precision try precision='bf16' or 'no'; "
        "check that the data has no empty or extreme examples.",
    )


class _Window:
    """The training figures accumulated since the last log point (on the device: no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.samples = self.steps = 0
        self.seconds = 0.0
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.started

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (e.g. an evaluation) out of the training time."""
        self.started += seconds

    def reset(self) -> None:
        self.loss.zero_()
        self.tokens.zero_()
        self.samples = self.steps = 0
        self.seconds = 0.0
        self.started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.detach().cpu().clone(),
            "tokens": int(self.tokens.item()),
            "samples": self.samples,
            "steps": self.steps,
            "seconds": self.elapsed(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.copy_(state["loss"])
        self.tokens.fill_(state["tokens"])
        self.samples, self.steps, self.seconds = state["samples"], state["steps"], state["seconds"]
        self.started = time.perf_counter()


def _finish_trackers(accelerator: Accelerator) -> None:
    """Close the trackers' files (not `accelerator.end_training`, which would also end a distributed run)."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()
    accelerator.trackers = []


# --------------------------------------------------------------------------------------------------------------
# fit


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
    holding the weights of its best evaluation. It comes back as it went in (no autocast wrapper left on it), and
    a loss that becomes nan or inf stops training with an `MfkitError` within a few steps.
    """
    accelerator = accelerator or make_accelerator(config)
    # This fit's own peak: on CUDA the peak is reset here and reported above the memory in use now.
    memory = MemoryWindow.start(accelerator.device, collect=False)
    if config.log_with and not accelerator.log_with:
        raise MfkitError(
            f"log_with={config.log_with!r} is set, but the accelerator given to fit() has no tracker.",
            "create it with Accelerator(log_with=..., project_dir=...), or let fit() create it.",
        )
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    groups = param_groups or parameter_groups(model, config.weight_decay, config.lr)
    fingerprint = run_fingerprint(config, model, groups, callbacks, accelerator.num_processes)
    optimizer = make_optimizer(groups, config.lr, config.betas, accelerator.device)
    scheduler = make_scheduler(
        optimizer,
        config.max_steps,
        warmup_steps_of(config.warmup, config.max_steps),
        config.schedule,
        config.min_lr_ratio,
    )
    prepared = accelerator.prepare(model, optimizer, train_loader)
    try:
        with tf32_matmuls(accelerator.device.type == "cuda"), no_kv_cache(model):
            return _train(
                prepared,
                scheduler,
                config,
                eval_loader,
                loss_fn,
                eval_fn,
                callbacks,
                accelerator,
                fingerprint,
                memory,
            )
    finally:
        release_model(accelerator, prepared[0])
        _finish_trackers(accelerator)


def _train(
    prepared: tuple,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    eval_loader: DataLoader | None,
    loss_fn: LossFn,
    eval_fn: EvalFn | None,
    callbacks: Sequence[Callback],
    accelerator: Accelerator,
    fingerprint: dict[str, Any],
    memory: MemoryWindow,
) -> History:
    """The loop of `fit`, on the prepared model, optimizer and loader."""
    model, optimizer, train_loader = prepared
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if accelerator.num_processes > 1:
        # Every process was seeded alike, so that all draw the same batches (the samplers have their own seeded
        # generators, already built). Dropout must differ between them, or each would drop the same units of
        # its shard: one draw that every process makes alike, plus the process's index, seeds its dropout.
        torch.manual_seed(int(torch.randint(2**62, ())) + accelerator.process_index)
    history = History()
    state = TrainState(model, optimizer, scheduler, accelerator, config, history)
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals = 0
    window = _Window(accelerator.device)
    nonfinite_at = torch.zeros(
        (), dtype=torch.long, device=accelerator.device
    )  # first step with a nan/inf loss

    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    if ckpt_path is not None and accelerator.is_main_process:
        remove_stale_temp_files(ckpt_path)  # left by a run killed while writing its checkpoint
    if ckpt_path is not None and accelerator.num_processes > 1:
        # The main process writes checkpoints while the others go on: all must see the same file (or none).
        accelerator.wait_for_everyone()
    if ckpt_path is not None and config.resume and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        check_fingerprint(ckpt_path, saved.get("fingerprint"), fingerprint)
        bare_model(accelerator, model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        for cb, cb_state in zip(callbacks, saved["callbacks"], strict=True):
            cb.load_state_dict(cb_state)
        state.history = history = History(**saved["history"])
        state.step, best_state, bad_evals = saved["step"], saved["best_state"], saved["bad_evals"]
        history.resumed_from = state.step
        state.should_stop = history.stopped_early
        mine = saved["ranks"][accelerator.process_index]
        window.load_state_dict(mine["window"])
        set_rng_state(mine["rng"])
    if config.log_with:
        accelerator.init_trackers(config.run_name)

    def check_finite() -> None:
        """Stop with an error if some process saw a nan/inf loss (a collective: every process calls it together)."""
        flag = accelerator.gather(nonfinite_at.reshape(1)) if accelerator.num_processes > 1 else nonfinite_at
        step = int(flag.max().item())
        if step:
            raise _nonfinite_error(step, config)

    def evaluate() -> dict[str, float]:
        with gathering_with(accelerator):
            metrics = (
                eval_fn(model, eval_loader)
                if eval_fn
                else evaluate_loss(model, eval_loader, loss_fn, accelerator)
            )
        if (
            accelerator.num_processes > 1
        ):  # one decision for all: the main process's figures (equal when gathered)
            metrics = broadcast_object_list([metrics])[0]
        model.train()
        return metrics

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise _nonfinite_error(state.step, config, what="weights")
        ranks = [{"rng": rng_state(), "window": window.state_dict()}]
        if accelerator.num_processes > 1:
            ranks = gather_object(ranks)  # one RNG state and logging window per process, in process order
        if not accelerator.is_main_process:
            return
        save_checkpoint(
            ckpt_path,
            {
                "fingerprint": fingerprint,
                "model": bare_model(accelerator, model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "step": state.step,
                "config": dataclasses.asdict(config),
                "history": dataclasses.asdict(history),
                "callbacks": [cb.state_dict() for cb in callbacks],
                "best_state": best_state,
                "bad_evals": bad_evals,
                "ranks": ranks,
            },
        )

    def log_window() -> None:
        loss_value = accelerator.reduce(window.loss, "mean").item() / window.steps  # the one host sync
        tokens = int(accelerator.reduce(window.tokens, "sum").item())
        samples = window.samples * accelerator.num_processes
        elapsed = window.elapsed()
        history.seconds += elapsed
        history.tokens += tokens
        history.samples += samples
        lrs = list(scheduler.get_last_lr())
        history.train.append(
            {
                "step": state.step,
                "loss": loss_value,
                "lr": lrs[0],
                "lrs": lrs,
                "tokens_per_s": tokens / elapsed,
                "samples_per_s": samples / elapsed,
            }
        )
        accelerator.log(
            {"train/loss": loss_value, "train/lr": lrs[0], "train/tokens_per_s": tokens / elapsed},
            step=state.step,
        )
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lrs[0]:.2e}")
        window.reset()

    for cb in callbacks:
        cb.on_train_begin(state)
    model.train()
    batches = _batches(train_loader, accelerator, state.step * config.grad_accum)
    bar = tqdm(
        total=config.max_steps,
        initial=state.step,
        desc="fit",
        disable=not (config.progress and accelerator.is_local_main_process),
    )

    while state.step < config.max_steps and not state.should_stop:
        for cb in callbacks:
            cb.on_step_begin(state)
        for micro in range(config.grad_accum):
            batch = next(batches)
            last = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss / config.grad_accum)
            nonfinite_at.masked_fill_((nonfinite_at == 0) & ~torch.isfinite(loss.detach()), state.step + 1)
            window.loss += loss.detach() / config.grad_accum
            window.tokens += count_tokens(batch)
            window.samples += batch_rows(batch)
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        # Where fp16's GradScaler skipped the update (inf/nan gradients), the schedule does not advance either.
        # (A fused AdamW skips inside its kernel instead, unseen without a host sync: the schedule then moves on.)
        if not optimizer.step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window.steps += 1
        bar.update(1)

        log_now = state.step % config.log_every == 0 or state.step == config.max_steps
        eval_now = bool(
            eval_loader is not None
            and config.eval_every
            and (state.step % config.eval_every == 0 or state.step == config.max_steps)
        )
        checkpoint_now = bool(config.checkpoint_every and state.step % config.checkpoint_every == 0)
        if log_now or eval_now or checkpoint_now or state.step % NONFINITE_CHECK_EVERY == 0:
            check_finite()
        if log_now:
            log_window()

        if eval_now:
            eval_start = time.perf_counter()
            metrics = evaluate()
            history.eval.append({"step": state.step, **metrics})
            accelerator.log(
                {
                    f"eval/{k.removeprefix('eval_')}": v
                    for k, v in metrics.items()
                    if isinstance(v, int | float)
                },
                step=state.step,
            )
            if config.monitor not in metrics:
                raise MfkitError(
                    f"monitor={config.monitor!r} is not among the metrics {sorted(metrics)}.",
                    "set TrainConfig.monitor to one of them.",
                )
            value = metrics[config.monitor]
            if _improved(value, history.best_metric, config.mode):
                history.best_step, history.best_metric, bad_evals = state.step, value, 0
                if config.restore_best:
                    best_state = {
                        k: v.detach().to("cpu", copy=True)
                        for k, v in bare_model(accelerator, model).state_dict().items()
                    }
            else:
                bad_evals += 1
                if config.patience is not None and bad_evals >= config.patience:
                    state.should_stop = history.stopped_early = True
            for cb in callbacks:
                cb.on_evaluate(state, metrics)
            window.pause(time.perf_counter() - eval_start)  # evaluation time is not training throughput

        for cb in callbacks:
            cb.on_step_end(state)
        if checkpoint_now:
            checkpoint_start = time.perf_counter()
            checkpoint()
            window.pause(time.perf_counter() - checkpoint_start)  # nor is writing a checkpoint

    bar.close()
    check_finite()
    if window.steps:  # a run stopped early between two log points
        history.seconds += window.elapsed()
        history.tokens += int(accelerator.reduce(window.tokens, "sum").item())
        history.samples += window.samples * accelerator.num_processes
        window.reset()
    history.steps = state.step
    history.peak_memory_mb, history.memory_kind = peak_memory(accelerator.device, memory)
    checkpoint()
    if config.restore_best and best_state is not None:
        bare_model(accelerator, model).load_state_dict(best_state)
    for cb in callbacks:
        cb.on_train_end(state)
    return history


def read_scalars(logging_dir: str | Path):
    """Every scalar that `fit(..., TrainConfig(log_with="tensorboard", logging_dir=...))` logged, as a DataFrame.

    Columns: run (the event files' folder under `logging_dir`, i.e. `run_name`), tag (`train/loss`,
    `eval/f1`, ...), step, value. For plotting with matplotlib where the TensorBoard app cannot run. Where a
    resumed run logged a step again, the later value is kept.
    """
    import pandas as pd

    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as exc:
        raise MfkitError(
            "Reading TensorBoard event files needs the tensorboard package.", "pip install tensorboard."
        ) from exc
    root = Path(logging_dir)
    rows = []
    for events in sorted(root.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        run = events.parent.relative_to(root).as_posix()
        for tag in accumulator.Tags()["scalars"]:
            rows += [
                {"run": run, "tag": tag, "step": e.step, "value": e.value, "wall_time": e.wall_time}
                for e in accumulator.Scalars(tag)
            ]
    if not rows:
        raise MfkitError(
            f"No TensorBoard scalars under {root}.",
            "train with TrainConfig(log_with='tensorboard', logging_dir=...) pointing at this folder.",
        )
    frame = pd.DataFrame(rows).sort_values("wall_time", kind="stable")
    frame = frame.drop_duplicates(["run", "tag", "step"], keep="last")
    return frame.drop(columns="wall_time").sort_values(["run", "tag", "step"]).reset_index(drop=True)
