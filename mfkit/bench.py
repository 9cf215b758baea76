"""`mfkit bench`: mfkit.fit vs Hugging Face Trainer vs a bare PyTorch loop, same work, one run.

Workloads (`--workload`):
  tiny-gpt     tiny GPT-2 (4 layers, 128 wide) pretraining on Austen, blocks of 128 tokens (all the same length)
  minilm       MiniLM + a 2-class head on spam mails cut at 128 tokens (almost all 128 long)
  minilm-512   the same on mails up to 512 tokens, where batching matters: its pool of 128 mails runs from 44 to
               512 tokens (median 322), and random batches of 16 are 37% padding (length-grouped: 7%)

  infer        prediction cost of the saved classifiers in an artifacts folder (`--artifacts`): notebook 03's
               teacher, notebook 16's distilled student, the pruned model of notebook 18 when built, and the
               dynamic-int8 version of each (built on the fly); see "The infer workload" below

Runners (`--runners`; default fit,trainer,bare, and on minilm-512 all five):
  fit              mfkit.fit, random batches (mfkit.loaders.EpochSampler)
  fit-grouped      mfkit.fit, length-grouped batches (make_loader(..., group_by_length=True))
  trainer          Trainer, the same random batches as fit, in the same order
  trainer-grouped  Trainer with its own length grouping (train_sampling_strategy="group_by_length")
  bare             a bare PyTorch loop (the floor of overhead), the same random batches

All runners get the same model initialisation, the same AdamW parameter groups (fused kernel where it exists),
warmup + linear schedule, gradient clipping and precision (autocast, and loss scaling under fp16, in the bare
loop too); batches are dynamically padded and only real (non-padding) tokens are counted.

How it times: every (workload, runner, repeat) runs in a fresh worker process (peak memory is per runner, and
no runner warms caches for another). A worker trains over a fixed pool of `--pool-batches` batches, pass after
pass: the first `--warmup-epochs` passes are not timed; then whole passes are timed until at least `--seconds`
of wall time have gone by, so every runner's timed work is the same rows, each once per pass, and only the
batching differs. On CUDA both timing marks wait for the device (`torch.cuda.synchronize`), for every runner.

Length grouping needs neighbours: mfkit's sampler sorts pools of 50 batches (here the whole pool), Trainer's
sorts mega-batches of min(50, pool/4) batches (2 on minilm-512's pool of 8). The padding column shows what each
runner padded; on a full training split both sort 50 batches at a time.

How it compares: within a repeat the runners run back to back (in reverse order every other repeat, so a
drifting machine load does not favour one side); each ratio (e.g. fit/trainer on tokens/s) is computed per
repeat and reported as the median of these paired ratios with their min-max. The verdict says "faster" or
"slower" only when every repeat agrees; ratios on both sides of 1 within `--tolerance` are "level"; wider than
that, the spread is too wide to call a difference (rerun on an idle machine, longer `--seconds`, more repeats).

The infer workload: every variant runs in a fresh worker process that loads it with plain transformers, times it
with `mfkit.inference.measure_speed` (test mails padded to exactly `--max-length` tokens, default the teacher's
length from its card; threads pinned; warm-up calls; latency = median forward time of one mail, throughput = mails/s
at `--batch-size`, default 32) and reports parameters and the size of its saved weights. The variants take turns
within a repeat (reversed every other repeat), and each ratio to the teacher (speed-up at batch 1, throughput,
size) is computed per repeat and reported as the median with its min-max, as above. Test F1 comes from each
model's card (`mfkit.json`) where the notebook that saved it wrote one; int8 variants show "-". A variant whose
folder is missing is listed as "not built: run notebook NN".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

RUNNERS = ("fit", "fit-grouped", "trainer", "trainer-grouped", "bare")
WORKLOADS = ("tiny-gpt", "minilm", "minilm-512")  # the training workloads ("all")
INFER = "infer"
# variant -> (folder under ARTIFACTS/models, the notebook that saves it, dynamic int8 on the fly)
INFER_VARIANTS = {
    "teacher": ("03-classifier", "03", False),
    "teacher-int8": ("03-classifier", "03", True),
    "student": ("16-student", "16", False),
    "student-int8": ("16-student", "16", True),
    "pruned": ("18-pruned", "18", False),
    "pruned-int8": ("18-pruned", "18", True),
}
INFER_TIMED_CALLS = 10  # forward passes at batch 1 per worker (a third of them at the large batch)
INFER_TEXTS = 64  # test mails cycled to fill the batches
DEFAULT_RUNNERS = {
    "tiny-gpt": ("fit", "trainer", "bare"),
    "minilm": ("fit", "trainer", "bare"),
    "minilm-512": RUNNERS,
}
# Batches per pass over the pool: enough rows for length grouping to find neighbours, few enough that one pass
# (the warm-up) is short; at batch 16 a pass takes seconds (tiny-gpt) to about half a minute (minilm-512, 2 cores).
POOL_BATCHES = {"tiny-gpt": 16, "minilm": 8, "minilm-512": 8}
# (numerator, denominator) of the ratios reported, when both runners ran.
COMPARISONS = (
    ("fit", "trainer"),
    ("fit", "bare"),
    ("fit-grouped", "trainer"),
    ("fit-grouped", "trainer-grouped"),
    ("fit-grouped", "fit"),
)
NOMINAL_STEPS = 100_000  # the schedule's length; the timing window ends every run long before
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for model FLOPs utilisation.
PEAK_TFLOPS = {
    "T4": 65.0,
    "V100": 125.0,
    "A10G": 125.0,
    "L4": 121.0,
    "A100": 312.0,
    "L40S": 362.0,
    "H100": 989.0,  # SXM
    "H100 PCIe": 756.0,
    "H200": 989.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The data-sheet peak of a CUDA device named `device_name` (as `torch.cuda.get_device_name` gives it).

    The longest name in `PEAK_TFLOPS` found in it wins, so that "NVIDIA L40S" is an L40S, not an L4, and
    "NVIDIA H100 PCIe" is not rated as the SXM part. None for a device not in the table.
    """
    found = [key for key in PEAK_TFLOPS if key in device_name]
    return PEAK_TFLOPS[max(found, key=len)] if found else None


@dataclass
class Workload:
    """Model factory, the pool of rows, the collate function and the sizes MFU needs."""

    make_model: Callable[[], Any]
    rows: list[dict]
    collate: Callable
    n_layer: int
    d_model: int


def tiny_gpt_workload(n_rows: int) -> Workload:
    """Tiny GPT-2 (4 layers, 128 wide, 4k BPE) pretraining on Austen blocks of 128 tokens."""
    from .data import load_data
    from .lm import block_collate, pack_blocks, tiny_gpt_config
    from .tokenization import train_bpe_tokenizer

    austen = list(load_data("austen")["train"]["text"])
    tokenizer = train_bpe_tokenizer(austen[:20000], vocab_size=4000)
    blocks = pack_blocks(austen[: 200 + 40 * n_rows], tokenizer, block_size=128)
    rows = [blocks[i] for i in range(min(len(blocks), n_rows))]
    config = tiny_gpt_config(vocab_size=len(tokenizer), n_layer=4, n_embd=128, n_head=4, block_size=128)

    def make_model():
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel(config)

    return Workload(make_model, rows, block_collate, 4, 128)  # notebook 02's collate: packed blocks, no mask


def spam_workload(n_rows: int, max_length: int) -> Workload:
    """MiniLM + a new 2-class head on the first `n_rows` spam training mails, cut at `max_length` tokens."""
    from .data import load_data
    from .loaders import pad_collate
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer("minilm")
    train = load_data("spam")["train"].select(range(n_rows))
    encoded = tokenizer(list(train["text"]), truncation=True, max_length=max_length)
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(
            encoded["input_ids"], encoded["attention_mask"], list(train["label"]), strict=True
        )
    ]
    return Workload(
        lambda: load_model("minilm", "sequence-classification", num_labels=2),
        rows,
        pad_collate(tokenizer.pad_token_id),
        6,
        384,
    )


def make_workload(name: str, n_rows: int) -> Workload:
    if name == "tiny-gpt":
        return tiny_gpt_workload(n_rows)
    return spam_workload(n_rows, 512 if name == "minilm-512" else 128)


class CountingCollate:
    """Wraps a collate function and remembers, for every batch it builds (in order), its real (non-padding)
    tokens, its padded size and the sum of squared row lengths (for the attention FLOPs)."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate
        self.counts: list[tuple[int, int, int]] = []

    def __call__(self, rows):
        batch = self.collate(rows)
        mask = batch.get("attention_mask")
        lengths = (
            mask.sum(dim=1)
            if mask is not None
            else batch["input_ids"].new_full((len(rows),), batch["input_ids"].shape[1])
        )
        self.counts.append((int(lengths.sum()), batch["input_ids"].numel(), int((lengths**2).sum())))
        return batch

    def totals(self, first: int, last: int) -> tuple[int, int, int]:
        """(real tokens, padded tokens, sum of squared lengths) over batches first..last-1."""
        if len(self.counts) < last:
            raise RuntimeError(
                f"only {len(self.counts)} batches were built, fewer than the {last} steps timed"
            )
        return tuple(sum(c[k] for c in self.counts[first:last]) for k in range(3))  # type: ignore[return-value]


class Window:
    """The timing window of one run: whole passes over the pool after `warmup_epochs` passes, until at least
    `seconds` have elapsed. `step_end(step)` is called after every optimizer step and says when to stop; `sync`
    (torch.cuda.synchronize on CUDA) runs at both marks so queued device work is inside the window."""

    def __init__(
        self,
        steps_per_epoch: int,
        seconds: float,
        warmup_epochs: int = 1,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.steps_per_epoch, self.seconds, self.warmup_epochs = steps_per_epoch, seconds, warmup_epochs
        self.sync, self.clock = sync or (lambda: None), clock
        self.start: float | None = None
        self.end: float | None = None
        self.start_step = self.end_step = 0

    def step_end(self, step: int) -> bool:
        """Take a mark at an epoch boundary when one is due; True once the window is closed."""
        if step % self.steps_per_epoch or self.end is not None:
            return self.end is not None
        if self.start is None:
            if step >= self.warmup_epochs * self.steps_per_epoch:
                self.sync()
                self.start, self.start_step = self.clock(), step
            return False
        if self.clock() - self.start < self.seconds:
            return False
        self.sync()
        self.end, self.end_step = self.clock(), step
        return True

    @property
    def elapsed(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the runner stopped before the timing window closed")
        return self.end - self.start


def run_worker(
    workload: str,
    runner: str,
    batch_size: int,
    seconds: float,
    warmup_epochs: int,
    pool_batches: int,
    threads: int | None,
    seed: int,
) -> dict:
    """Train one runner on one workload; return throughput over the timed window and the process peak memory."""
    import torch

    from .env import seed_everything
    from .loaders import make_loader
    from .timing import synchronize
    from .training import TrainConfig, make_accelerator, peak_memory

    if threads:
        torch.set_num_threads(threads)
    work = make_workload(workload, batch_size * pool_batches)
    if len(work.rows) < batch_size * pool_batches:
        raise RuntimeError(
            f"{workload} has {len(work.rows)} rows, fewer than {pool_batches} batches of {batch_size}"
        )
    seed_everything(seed)
    model = work.make_model()
    counting = CountingCollate(work.collate)
    config = TrainConfig(
        max_steps=NOMINAL_STEPS, lr=1e-4, warmup=0.1, log_every=NOMINAL_STEPS, progress=False
    )
    # the marks wait for the device the model trains on (the runner has moved it there by the first mark)
    window = Window(
        pool_batches, seconds, warmup_epochs, lambda: synchronize(next(model.parameters()).device)
    )
    kind, grouped = runner.removesuffix("-grouped"), runner.endswith("-grouped")
    if kind == "trainer":
        run_trainer(model, work.rows, counting, batch_size, config, seed, window, grouped)
    else:
        loader = make_loader(work.rows, batch_size, counting, seed=seed, group_by_length=grouped)
        if kind == "fit":
            run_fit(model, loader, config, window)
        else:
            accelerator = make_accelerator(config)  # the device, precision and TF32 settings fit would use
            run_bare_loop(model, loader, config, window, accelerator.device, accelerator.mixed_precision)
    seconds_timed = window.elapsed
    tokens, padded, squares = counting.totals(window.start_step, window.end_step)
    steps = window.end_step - window.start_step
    device = next(model.parameters()).device
    flops = 6 * matmul_parameters(model) * tokens + 12 * work.n_layer * work.d_model * squares
    memory, memory_kind = peak_memory(device)
    return {
        "workload": workload,
        "runner": runner,
        "seconds": seconds_timed,
        "steps": steps,
        "epochs": steps // pool_batches,
        "tokens": tokens,
        "padding": 1 - tokens / padded,
        "tokens_per_s": tokens / seconds_timed,
        "samples_per_s": steps * batch_size / seconds_timed,
        "peak_memory_mb": memory,
        "memory_kind": memory_kind,
        "model_tflops_per_s": flops / seconds_timed / 1e12,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def matmul_parameters(model) -> int:
    """The N of "6 N FLOPs per trained token": weights that multiply every token (linear layers, GPT-2's Conv1D,
    and a tied output projection through its Linear module). Embedding lookups do no arithmetic and are left out;
    counting them would overstate MiniLM's FLOPs almost twofold (half its weights are the word embeddings)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear | Conv1D))


def run_fit(model, loader, config, window: Window) -> None:
    """mfkit.fit, stopped by a callback when the window closes."""
    from .training import Callback, fit

    class Timer(Callback):
        def on_step_end(self, state) -> None:
            state.should_stop = window.step_end(state.step) or state.should_stop

    fit(model, loader, config, callbacks=[Timer()])


def run_bare_loop(model, loader, config, window: Window, device, precision: str = "no") -> None:
    """The floor of overhead: forward (under autocast when `precision` is bf16/fp16), backward (loss-scaled under
    fp16), clip, step; epoch after epoch until the window closes."""
    import torch

    from .optim import make_optimizer, make_scheduler, parameter_groups, warmup_steps_of
    from .training import tf32_matmuls

    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.to(device).train()
    optimizer = make_optimizer(
        parameter_groups(model, config.weight_decay, config.lr), config.lr, config.betas, device
    )
    scheduler = make_scheduler(
        optimizer, config.max_steps, warmup_steps_of(config.warmup, config.max_steps), config.schedule
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    with tf32_matmuls(device.type == "cuda"):  # as fit does
        _bare_epochs(model, loader, config, window, device, dtype, optimizer, scheduler, scaler)


def _bare_epochs(model, loader, config, window: Window, device, dtype, optimizer, scheduler, scaler) -> None:
    import torch

    step = 0
    for epoch in range(config.max_steps):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with autocast:
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if window.step_end(step) or step == config.max_steps:
                return


def run_trainer(
    model, rows, collate, batch_size: int, config, seed: int, window: Window, grouped: bool = False
) -> None:
    """Hugging Face Trainer with the same optimizer, schedule, clipping and no logging overhead; the same batch
    order as fit, or (grouped) Trainer's own length grouping."""
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .env import pick_precision
    from .loaders import EpochSampler
    from .optim import fused_adamw_supported
    from .training import tf32_matmuls

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return EpochSampler(len(rows), shuffle=True, seed=seed)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if window.step_end(state.global_step):
                control.should_training_stop = True

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="mfkit-bench-"),
        per_device_train_batch_size=batch_size,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=round(config.warmup * config.max_steps),
        lr_scheduler_type="linear",
        max_grad_norm=config.grad_clip,
        optim="adamw_torch_fused" if fused_adamw_supported(torch.device(device)) else "adamw_torch",
        logging_steps=config.max_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        seed=seed,
        bf16=pick_precision(device) == "bf16",
        fp16=pick_precision(device) == "fp16",
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if grouped else "random",
    )
    trainer_class = Trainer if grouped else SameOrderTrainer
    trainer = trainer_class(
        model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Timer()]
    )
    with tf32_matmuls(cuda):  # fit allows TF32 for the matmuls autocast leaves in fp32; the same here
        trainer.train()


def mfu(result: dict) -> float | None:
    """Model FLOPs utilisation on a known CUDA device, else None."""
    import torch

    if not result["device"].startswith("cuda"):
        return None
    peak = peak_tflops(torch.cuda.get_device_name(result["device"]))
    return result["model_tflops_per_s"] / peak if peak else None


def verdict(ratios: list[float], tolerance: float) -> str:
    """What paired ratios (numerator/denominator, one per repeat) allow one to say."""
    if len(ratios) < 3:
        return f"{len(ratios)} repeat(s): too few to call a difference"
    low, high = min(ratios), max(ratios)
    if low > 1:
        return f"faster in all {len(ratios)} repeats"
    if high < 1:
        return f"slower in all {len(ratios)} repeats"
    if high - low <= tolerance:
        return f"level (all repeats within {tolerance:.0%} around 1)"
    return "spread too wide to call a difference"


def paired_ratios(
    results: list[dict], workload: str, numerator: str, denominator: str, key: str = "tokens_per_s"
) -> list[float]:
    """`key` (default tokens/s) of `numerator` over `denominator`, one ratio per repeat in which both ran."""
    by_repeat: dict[tuple[str, int], float] = {
        (r["runner"], r["repeat"]): r[key] for r in results if r["workload"] == workload
    }
    repeats = sorted({repeat for _, repeat in by_repeat})
    return [
        by_repeat[numerator, k] / by_repeat[denominator, k]
        for k in repeats
        if (numerator, k) in by_repeat and (denominator, k) in by_repeat
    ]


def summarize(results: list[dict], tolerance: float = 0.05) -> dict[str, list[dict]]:
    """Per (workload, runner): medians and the tokens/s range; per workload and comparison: the median of the
    paired per-repeat ratios, their min-max and the verdict."""
    runners, ratios = [], []
    for workload in dict.fromkeys(r["workload"] for r in results):
        present = [
            name
            for name in RUNNERS
            if any(r["workload"] == workload and r["runner"] == name for r in results)
        ]
        for runner in present:
            runs = [r for r in results if r["workload"] == workload and r["runner"] == runner]
            row = {"workload": workload, "runner": runner, "repeats": len(runs), "mfu": mfu(runs[0])}
            for key in (
                "tokens_per_s",
                "samples_per_s",
                "padding",
                "peak_memory_mb",
                "model_tflops_per_s",
                "seconds",
            ):
                row[key] = statistics.median(r[key] for r in runs)
            row["tokens_per_s_min"] = min(r["tokens_per_s"] for r in runs)
            row["tokens_per_s_max"] = max(r["tokens_per_s"] for r in runs)
            runners.append(row)
        for numerator, denominator in COMPARISONS:
            paired = paired_ratios(results, workload, numerator, denominator)
            if paired:
                ratios.append(
                    {
                        "workload": workload,
                        "ratio": f"{numerator}/{denominator}",
                        "median": statistics.median(paired),
                        "min": min(paired),
                        "max": max(paired),
                        "paired": paired,
                        "verdict": verdict(paired, tolerance),
                    }
                )
    return {"runners": runners, "ratios": ratios}


def format_table(summary: dict[str, list[dict]]) -> str:
    """The runner table and the ratio table, as printed."""
    head = (
        f"{'workload':<10} {'runner':<15} {'tokens/s':>9} {'min-max':>13} {'samples/s':>9} {'padding':>7} "
        f"{'peak MB':>8} {'MFU':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in summary["runners"]:
        spread = f"{r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}"
        utilisation = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        lines.append(
            f"{r['workload']:<10} {r['runner']:<15} {r['tokens_per_s']:>9.0f} {spread:>13} {r['samples_per_s']:>9.2f} "
            f"{r['padding']:>7.1%} {r['peak_memory_mb']:>8.0f} {utilisation:>6}"
        )
    if any(r["runner"] == "trainer-grouped" for r in summary["runners"]):
        lines.append(
            "(trainer-grouped sorts mega-batches of min(50, pool/4) batches, fit-grouped pools of 50: "
            "see the padding column)"
        )
    head = f"{'workload':<10} {'ratio of tokens/s':<28} {'median':>6}  {'min-max':<11}  verdict"
    lines += ["", "paired ratios (one per repeat, runners back to back):", head, "-" * (len(head) + 30)]
    for r in summary["ratios"]:
        lines.append(
            f"{r['workload']:<10} {r['ratio']:<28} {r['median']:>6.3f}  {r['min']:.3f}-{r['max']:.3f}  "
            f"{r['verdict']}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# The infer workload: prediction cost of saved classifiers


def infer_folder(artifacts, variant: str):
    """Where `variant`'s saved classifier lives under `artifacts` (whether or not it exists)."""
    from pathlib import Path

    return Path(artifacts) / "models" / INFER_VARIANTS[variant][0]


def read_card(folder) -> dict:
    """The card (`mfkit.json`) a notebook saved beside a classifier, or {} where there is none."""
    from .classify import CARD_NAME

    path = folder / CARD_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def default_max_length(artifacts) -> int:
    """The teacher's training length from its card (every variant is timed at it), else 128."""
    settings = read_card(infer_folder(artifacts, "teacher")).get("settings", {})
    return int(settings.get("max_length") or 128)


def run_infer_worker(
    variant: str,
    artifacts,
    batch_size: int,
    max_length: int,
    threads: int | None,
    int8_scales: str = "per-channel",
) -> dict:
    """Load one variant with plain transformers (int8: quantized after loading, with one weight scale per output
    row or per tensor) and measure its prediction cost."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .data import load_data
    from .inference import measure_speed, saved_weights_mb

    if threads:
        torch.set_num_threads(threads)
    folder = infer_folder(artifacts, variant)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    if INFER_VARIANTS[variant][2]:
        from .quantize import quantize_dynamic_int8

        model = quantize_dynamic_int8(model, per_channel=int8_scales == "per-channel")
    texts = [t or " " for t in load_data("spam")["test"]["text"][:INFER_TEXTS]]
    speed = measure_speed(
        model, tokenizer, texts, max_length, batch_size=batch_size, repeats=INFER_TIMED_CALLS, warmup=3
    )
    return {
        "workload": INFER,
        "runner": variant,
        "latency_ms": speed.latency_ms,
        "throughput": speed.throughput,
        "size_mb": saved_weights_mb(model),
        "params": params,
        "threads": speed.threads,
        "batch_size": batch_size,
        "max_length": max_length,
    }


def summarize_infer(results: list[dict], f1s: dict[str, float], tolerance: float = 0.05) -> list[dict]:
    """One row per variant: medians and min-max of latency and throughput, and the median of the paired
    per-repeat ratios to the teacher (speed-up at batch 1, throughput, size) with their verdicts."""
    rows = []
    for variant in INFER_VARIANTS:
        runs = [r for r in results if r["runner"] == variant]
        if not runs:
            continue
        row = {
            "variant": variant,
            "repeats": len(runs),
            "test_f1": f1s.get(variant),
            "params": runs[0]["params"],
        }
        for key in ("latency_ms", "throughput", "size_mb"):
            row[key] = statistics.median(r[key] for r in runs)
            row[f"{key}_min"], row[f"{key}_max"] = min(r[key] for r in runs), max(r[key] for r in runs)
        for name, (numerator, denominator, key) in {
            "speedup": ("teacher", variant, "latency_ms"),
            "throughput_x": (variant, "teacher", "throughput"),
            "size_x": (variant, "teacher", "size_mb"),
        }.items():
            paired = paired_ratios(results, INFER, numerator, denominator, key)
            if paired:
                row[name] = statistics.median(paired)
                row[f"{name}_min"], row[f"{name}_max"] = min(paired), max(paired)
                row[f"{name}_verdict"] = verdict(paired, tolerance)
        rows.append(row)
    return rows


def format_infer_table(rows: list[dict], missing: dict[str, str], settings: str = "") -> str:
    """The infer table as printed: one line per measured variant, then the variants not built."""
    head = (
        f"{'variant':<13} {'test F1':>7} {'size MB':>8} {'params':>11} {'latency ms':>10} {'mails/s':>8} "
        f"{'size x':>6} {'speed-up b1 (min-max)':>22} {'throughput x (min-max)':>23}"
    )
    lines = [settings, head, "-" * len(head)] if settings else [head, "-" * len(head)]

    def ratio(row: dict, name: str) -> str:
        if name not in row:
            return "-"
        return f"{row[name]:.2f} ({row[name + '_min']:.2f}-{row[name + '_max']:.2f})"

    for r in rows:
        f1 = f"{r['test_f1']:.4f}" if isinstance(r.get("test_f1"), int | float) else "-"
        lines.append(
            f"{r['variant']:<13} {f1:>7} {r['size_mb']:>8.1f} {r['params']:>11,} {r['latency_ms']:>10.2f} "
            f"{r['throughput']:>8.1f} {r.get('size_x', float('nan')):>6.2f} {ratio(r, 'speedup'):>22} "
            f"{ratio(r, 'throughput_x'):>23}"
        )
    for variant, notebook in missing.items():
        lines.append(f"{variant:<13} not built: run notebook {notebook}")
    verdicts = [
        f"{r['variant']}: {r['throughput_x_verdict']}"
        for r in rows
        if "throughput_x_verdict" in r and r["variant"] != "teacher"
    ]
    if verdicts:
        lines += ["", "throughput against the teacher, per repeat: " + "; ".join(verdicts)]
    return "\n".join(lines)


def infer_main(args: argparse.Namespace) -> int:
    """`mfkit bench --workload infer`: every variant found under the artifacts folder, interleaved repeats."""
    from .paths import artifacts_dir

    artifacts = artifacts_dir(args.artifacts)
    found = {v for v in INFER_VARIANTS if (infer_folder(artifacts, v) / "config.json").is_file()}
    if "teacher" not in found:
        print(
            f"No teacher under {infer_folder(artifacts, 'teacher')}. Fix: run notebook 03 with this "
            "ARTIFACTS_DIR, or pass --artifacts with the folder that holds models/03-classifier.",
            file=sys.stderr,
        )
        return 2
    variants = [v for v in INFER_VARIANTS if v in found]
    missing = {v: INFER_VARIANTS[v][1] for v in INFER_VARIANTS if v not in found}
    args.artifacts = str(artifacts)
    args.max_length = args.max_length or default_max_length(artifacts)
    results = run_interleaved(
        INFER,
        variants,
        args,
        lambda variant, repeat, r: (
            f"{variant:<13} repeat {repeat + 1}: {r['latency_ms']:.2f} ms at batch 1, "
            f"{r['throughput']:.1f} mails/s at batch {r['batch_size']}"
        ),
    )
    f1s = {}
    for variant in variants:
        card = read_card(infer_folder(artifacts, variant))
        if not INFER_VARIANTS[variant][2] and "test_f1" in card.get("scores", {}):
            f1s[variant] = card["scores"]["test_f1"]
    rows = summarize_infer(results, f1s, args.tolerance)
    threads = results[0]["threads"]
    settings = (
        f"{artifacts}: {args.repeats} repeat(s), {threads} thread(s), mails of {args.max_length} tokens, "
        f"throughput at batch {args.batch_size}, int8 weights with {args.int8_scales} scales"
    )
    print(format_infer_table(rows, missing, settings))
    if args.json:
        from pathlib import Path

        from .paths import atomic_path

        settings_json = {k: v for k, v in vars(args).items() if k != "worker" and not callable(v)}
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(
                json.dumps(
                    {"settings": settings_json, "variants": rows, "missing": missing, "runs": results},
                    indent=2,
                )
            )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the module docstring keeps its layout
    parser.add_argument(
        "--workload",
        choices=(*WORKLOADS, "all", INFER),
        default="all",
        help="a training workload, all of them, or infer (not part of all: it needs saved models)",
    )
    parser.add_argument(
        "--runners",
        default=None,
        help=f"comma-separated subset of {','.join(RUNNERS)} (default: per workload, see above)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=20.0,
        help="timed wall time per measurement, rounded up to whole passes over the pool (default 20)",
    )
    parser.add_argument(
        "--warmup-epochs", type=int, default=1, help="untimed passes over the pool first (default 1)"
    )
    parser.add_argument(
        "--pool-batches",
        type=int,
        default=None,
        help="batches per pass over the pool (default: tiny-gpt 16, minilm 8, minilm-512 8)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per batch (default: 16 training, 32 infer)"
    )
    parser.add_argument(
        "--artifacts",
        default=None,
        help="infer: the artifacts folder with models/03-classifier etc. (default: the kit's artifacts dir)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="infer: tokens per timed mail (default: the teacher's max_length from its card, else 128)",
    )
    parser.add_argument(
        "--int8-scales",
        choices=("per-channel", "per-tensor"),
        default="per-channel",
        help="infer: one int8 weight scale per output row or one per weight tensor; notebook 17 keeps one of "
        "the two, chosen on validation, and records which as int8_variant (default: per-channel)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="paired ratios on both sides of 1 within this range count as level (default 0.05)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in every worker (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "RUNNER"), help=argparse.SUPPRESS)


def check_arguments(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, phrased with its fix, or None."""
    if args.runners is not None:
        unknown = sorted(set(r.strip() for r in args.runners.split(",")) - set(RUNNERS))
        if unknown:
            return f"Unknown runner(s) {unknown}. Fix: choose from {', '.join(RUNNERS)}."
    for name in ("seconds", "repeats", "batch_size", "warmup_epochs", "pool_batches", "max_length"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            return (
                f"--{name.replace('_', '-')}={value} must be greater than zero. Fix: pass a positive number."
            )
    return None


def main(args: argparse.Namespace) -> int:
    infer = args.workload == INFER or (args.worker and args.worker[0] == INFER)
    args.batch_size = args.batch_size or (32 if infer else 16)
    if args.worker and infer:
        result = run_infer_worker(
            args.worker[1], args.artifacts, args.batch_size, args.max_length, args.threads, args.int8_scales
        )
        print("MFKIT_BENCH " + json.dumps(result))
        return 0
    if args.worker:
        workload = args.worker[0]
        result = run_worker(
            *args.worker,
            args.batch_size,
            args.seconds,
            args.warmup_epochs,
            args.pool_batches or POOL_BATCHES[workload],
            args.threads,
            args.seed,
        )
        print("MFKIT_BENCH " + json.dumps(result))
        return 0
    problem = check_arguments(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if infer:
        return infer_main(args)
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    results = []
    for workload in workloads:
        runners = (
            [r.strip() for r in args.runners.split(",")] if args.runners else list(DEFAULT_RUNNERS[workload])
        )
        results += run_interleaved(
            workload,
            runners,
            args,
            lambda runner, repeat, r, workload=workload: (
                f"{workload:<10} {runner:<15} repeat {repeat + 1}: "
                f"{r['tokens_per_s']:.0f} tokens/s over {r['seconds']:.1f} s ({r['epochs']} passes)"
            ),
        )
    summary = summarize(results, args.tolerance)
    print(format_table(summary))
    if args.json:
        from pathlib import Path

        from .paths import atomic_path

        settings = {k: v for k, v in vars(args).items() if k != "worker" and not callable(v)}
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps({"settings": settings, **summary, "runs": results}, indent=2))
    return 0


def run_interleaved(
    workload: str, runners: Sequence[str], args: argparse.Namespace, describe: Callable[[str, int, dict], str]
) -> list[dict]:
    """Every runner once per repeat, each in a fresh worker process, in alternating order (A B, B A, ...) so a
    drift of the machine during the run affects every runner alike; prints `describe(runner, repeat, result)`."""
    results = []
    for repeat in range(args.repeats):
        for runner in runners if repeat % 2 == 0 else list(runners)[::-1]:
            result = {**spawn_worker(workload, runner, args), "repeat": repeat}
            results.append(result)
            print(f"  {describe(runner, repeat, result)}", flush=True)
    return results


def spawn_worker(workload: str, runner: str, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh interpreter and parse its result line."""
    cmd = [
        sys.executable,
        "-m",
        "mfkit.cli",
        "bench",
        "--worker",
        workload,
        runner,
        "--seconds",
        str(args.seconds),
        "--warmup-epochs",
        str(args.warmup_epochs),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
    ]
    if args.pool_batches:
        cmd += ["--pool-batches", str(args.pool_batches)]
    if workload == INFER:
        cmd += ["--artifacts", str(args.artifacts), "--max-length", str(args.max_length)]
        cmd += ["--int8-scales", args.int8_scales]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("MFKIT_BENCH ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker {workload}/{runner} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("MFKIT_BENCH "))
