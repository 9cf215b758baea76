"""`mfkit bench`: mfkit.fit vs Hugging Face Trainer vs a bare PyTorch loop, same work, one run.

Every (workload, runner, repeat) runs in a fresh worker process, so peak memory is per runner and no runner
warms caches for another; repeats are interleaved (fit, trainer, bare, fit, ...) so drift hits all alike.
All three runners see the same model initialisation, the same batches in the same order (dynamic padding,
non-padding tokens counted), the same AdamW groups, warmup + linear schedule, clipping and precision.
The first `--warmup` steps are excluded from the timing; each figure is the median over `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RUNNERS = ("fit", "trainer", "bare")
WORKLOADS = ("tiny-gpt", "minilm")
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for model FLOPs utilisation.
PEAK_TFLOPS = {"T4": 65.0, "V100": 125.0, "A10G": 125.0, "L4": 121.0, "A100": 312.0, "L40S": 362.0, "H100": 989.0}


@dataclass
class Workload:
    """Model factory, rows, collate function and the sizes MFU needs."""

    make_model: Callable[[], Any]
    rows: list[dict]
    collate: Callable
    n_layer: int
    d_model: int
    seq_len: int


def tiny_gpt_workload(batch_size: int, steps: int) -> Workload:
    """Tiny GPT-2 (4 layers, 128 wide, 4k BPE) pretraining on Austen blocks of 128 tokens."""
    from .data import load_data
    from .lm import pack_blocks, tiny_gpt_config
    from .loaders import pad_collate
    from .tokenization import train_bpe_tokenizer

    austen = list(load_data("austen")["train"]["text"])
    tokenizer = train_bpe_tokenizer(austen[:20000], vocab_size=4000)
    blocks = pack_blocks(austen[: 200 + 40 * batch_size * steps], tokenizer, block_size=128)
    rows = [blocks[i] for i in range(min(len(blocks), batch_size * steps))]
    config = tiny_gpt_config(vocab_size=len(tokenizer), n_layer=4, n_embd=128, n_head=4, block_size=128)

    def make_model():
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel(config)

    return Workload(make_model, rows, pad_collate(tokenizer.pad_token_id), 4, 128, 128)


def minilm_workload(batch_size: int, steps: int) -> Workload:
    """MiniLM + a new 2-class head on spam mails truncated to 128 tokens, dynamically padded."""
    from .data import load_data
    from .loaders import pad_collate
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer("minilm")
    train = load_data("spam")["train"].select(range(batch_size * steps))
    encoded = tokenizer(list(train["text"]), truncation=True, max_length=128)
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], list(train["label"]), strict=True)
    ]
    return Workload(
        lambda: load_model("minilm", "sequence-classification", num_labels=2),
        rows, pad_collate(tokenizer.pad_token_id), 6, 384, 128,
    )


class CountingCollate:
    """Wraps a collate function and remembers the real (non-padding) tokens of every batch it builds, in order."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate
        self.tokens: list[int] = []

    def __call__(self, rows):
        batch = self.collate(rows)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch


def run_worker(workload: str, runner: str, batch_size: int, steps: int, warmup: int, threads: int | None, seed: int) -> dict:
    """Train one runner on one workload; return throughput over the timed steps and the process peak memory."""
    import torch

    from .env import seed_everything
    from .loaders import make_loader
    from .training import Callback, TrainConfig, fit, peak_memory

    if threads:
        torch.set_num_threads(threads)
    total = warmup + steps
    work = {"tiny-gpt": tiny_gpt_workload, "minilm": minilm_workload}[workload](batch_size, total)
    seed_everything(seed)
    model = work.make_model()
    counting = CountingCollate(work.collate)
    loader = make_loader(work.rows, batch_size, counting, seed=seed)
    config = TrainConfig(max_steps=total, lr=1e-4, warmup=0.1, log_every=total, progress=False)
    marks: dict[str, float] = {}

    def mark(step: int) -> None:
        if step == warmup:
            marks["start"] = time.perf_counter()
        if step == total:
            marks["end"] = time.perf_counter()

    if runner == "fit":
        class Timer(Callback):
            def on_step_end(self, state) -> None:
                mark(state.step)

        fit(model, loader, config, callbacks=[Timer()])
    elif runner == "bare":
        run_bare_loop(model, loader, config, mark)
    else:
        run_trainer(model, work.rows, counting, batch_size, config, seed, mark)
    device = next(model.parameters()).device
    seconds = marks["end"] - marks["start"]
    tokens = sum(counting.tokens[warmup:total])
    flops = 6 * matmul_parameters(model) * tokens + 12 * work.n_layer * work.d_model * work.seq_len * tokens
    return {
        "workload": workload, "runner": runner, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "samples_per_s": steps * batch_size / seconds,
        "peak_memory_mb": peak_memory(device)[0], "memory_kind": peak_memory(device)[1],
        "model_tflops_per_s": flops / seconds / 1e12, "device": str(device), "threads": torch.get_num_threads(),
    }


def matmul_parameters(model) -> int:
    """The N of "6 N FLOPs per trained token": weights that multiply every token (linear layers, GPT-2's Conv1D,
    and a tied output projection through its Linear module). Embedding lookups do no arithmetic and are left out;
    counting them would overstate MiniLM's FLOPs almost twofold (half its weights are the word embeddings)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear | Conv1D))


def run_bare_loop(model, loader, config, mark: Callable[[int], None]) -> None:
    """The floor of overhead: forward, backward, clip, step; nothing else."""
    import torch

    from .optim import make_optimizer, make_scheduler, parameter_groups, warmup_steps_of

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    optimizer = make_optimizer(parameter_groups(model, config.weight_decay, config.lr), config.lr, config.betas, device)
    scheduler = make_scheduler(optimizer, config.max_steps, warmup_steps_of(config.warmup, config.max_steps), config.schedule)
    step = 0
    loader.sampler.set_epoch(0)
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        mark(step)
        if step == config.max_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
        mark(step)


def run_trainer(model, rows, collate, batch_size: int, config, seed: int, mark: Callable[[int], None]) -> None:
    """Hugging Face Trainer with the same optimizer, schedule, clipping, batch order and no logging overhead."""
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .env import pick_precision
    from .loaders import EpochSampler
    from .optim import fused_adamw_supported

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return EpochSampler(len(rows), shuffle=True, seed=seed)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            mark(state.global_step)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="mfkit-bench-"), per_device_train_batch_size=batch_size,
        max_steps=config.max_steps, learning_rate=config.lr, weight_decay=config.weight_decay,
        warmup_steps=round(config.warmup * config.max_steps), lr_scheduler_type="linear", max_grad_norm=config.grad_clip,
        optim="adamw_torch_fused" if fused_adamw_supported(torch.device(device)) else "adamw_torch", logging_steps=config.max_steps, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, use_cpu=not cuda, seed=seed,
        bf16=pick_precision(device) == "bf16", fp16=pick_precision(device) == "fp16",
        remove_unused_columns=False,
    )
    trainer = SameOrderTrainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Timer()])
    trainer.train()


def mfu(result: dict) -> float | None:
    """Model FLOPs utilisation on a known CUDA device, else None."""
    import torch

    if not result["device"].startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return result["model_tflops_per_s"] / peak if peak else None


def summarize(results: list[dict]) -> list[dict]:
    """Median per (workload, runner), plus the ratios fit/Trainer and fit/bare on tokens/s."""
    rows = []
    for workload in dict.fromkeys(r["workload"] for r in results):
        medians = {}
        for runner in RUNNERS:
            runs = [r for r in results if r["workload"] == workload and r["runner"] == runner]
            if not runs:
                continue
            medians[runner] = {
                key: statistics.median(r[key] for r in runs)
                for key in ("tokens_per_s", "samples_per_s", "peak_memory_mb", "model_tflops_per_s")
            }
            medians[runner]["repeats"] = len(runs)
            medians[runner]["mfu"] = mfu(runs[0])
        fit_tps = medians.get("fit", {}).get("tokens_per_s")
        for runner, figures in medians.items():
            row = {"workload": workload, "runner": runner, **figures}
            for other in ("trainer", "bare"):
                if fit_tps and other in medians:
                    row[f"fit/{other}"] = fit_tps / medians[other]["tokens_per_s"] if runner == "fit" else None
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'workload':<9} {'runner':<8} {'tokens/s':>9} {'samples/s':>9} {'peak MB':>8} {'fit/Trainer':>11} {'fit/bare':>8} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        vs_trainer, vs_bare = (f"{r[k]:.3f}" if r.get(k) else "" for k in ("fit/trainer", "fit/bare"))
        utilisation = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        lines.append(
            f"{r['workload']:<9} {r['runner']:<8} {r['tokens_per_s']:>9.0f} {r['samples_per_s']:>9.2f} "
            f"{r['peak_memory_mb']:>8.0f} {vs_trainer:>11} {vs_bare:>8} {utilisation:>6}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated subset of fit,trainer,bare")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing starts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "RUNNER"), help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.worker:
        result = run_worker(*args.worker, args.batch_size, args.steps, args.warmup, args.threads, args.seed)
        print("MFKIT_BENCH " + json.dumps(result))
        return 0
    runners = [r.strip() for r in args.runners.split(",")]
    unknown = set(runners) - set(RUNNERS)
    if unknown:
        print(f"Unknown runner(s) {sorted(unknown)}. Fix: choose from {', '.join(RUNNERS)}.", file=sys.stderr)
        return 2
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    results = []
    for workload in workloads:
        for repeat in range(args.repeats):
            for runner in runners:
                results.append(spawn_worker(workload, runner, args))
                r = results[-1]
                print(f"  {workload:<9} {runner:<8} repeat {repeat + 1}: {r['tokens_per_s']:.0f} tokens/s", flush=True)
    rows = summarize(results)
    print(format_table(rows))
    settings = {k: v for k, v in vars(args).items() if k != "worker" and not callable(v)}
    report = {"settings": settings, "summary": rows, "runs": results}
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        from pathlib import Path

        from .paths import atomic_path

        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    return 0


def spawn_worker(workload: str, runner: str, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh interpreter and parse its result line."""
    cmd = [sys.executable, "-m", "mfkit.cli", "bench", "--worker", workload, runner, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("MFKIT_BENCH ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker {workload}/{runner} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("MFKIT_BENCH "))

