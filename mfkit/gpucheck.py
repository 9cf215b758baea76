"""A first GPU run in one command: `python -m mfkit.gpucheck OUTDIR` (or `mfkit gpu-check OUTDIR`).

It needs only torch, transformers, accelerate and peft (bitsandbytes where present): no data, no downloads, no
papermill. Models shaped like the notebooks' MiniLM and SmolLM2-135M are built from their configurations with
random weights, then trained with the kit's own `training.fit` at the `gpu` profile's batch and length:

- each family under fp16 and under bf16 autocast (bf16 only where the GPU has it natively), twice on the same
  model object (the second `fit` must run under autocast again), every step watched for the autocast wrapper and
  the head's dtype;
- LoRA (peft) on the SmolLM2-shaped model, interrupted half way and resumed from its checkpoint;
- QLoRA's 4-bit path the same way, where bitsandbytes imports and CUDA is present;
- a batch of generation at notebook 19's largest batch.

Each check runs on its own (one failure does not stop the others) and one table is printed and written to
OUTDIR/gpu_check.csv and .json: check, status (ok / failed: why / skipped: why), seconds, peak memory in MB.
On CUDA the peak is `torch.cuda.max_memory_allocated` since the check began; on a CPU, the rise of the
process's peak resident set during the check (0 where an earlier check already went higher).

`--memory OUTDIR` instead measures the peak memory of one fp32 training step (or one generation batch) at the
`gpu` profile's shapes on the CPU, each shape in a fresh process, beside an analytic fp16 estimate for a T4.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .profiles import PROFILES

MINILM_NOTEBOOK = "03_full-finetuning"  # 04, 05, 09, 14, 16, 18 train MiniLM on 03's batch and length
SMOLLM2_NOTEBOOK = "06_instruction-tuning"
GENERATION_NOTEBOOK = "19_decoding-inference"
LORA_RANK = 8


# --------------------------------------------------------------------------------------------------------------
# Models shaped like the notebooks', with random weights


def minilm_config(small: bool = False):
    """all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads); `small`: a toy of the same family for tests."""
    from transformers import BertConfig

    if small:
        return BertConfig(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )


def smollm2_config(small: bool = False):
    """SmolLM2-135M's shape (30 layers, 576 wide, 9 heads, 3 key/value heads, tied embeddings); `small`: a toy."""
    from transformers import LlamaConfig

    if small:
        return LlamaConfig(
            vocab_size=1000,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            intermediate_size=96,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def tiny_gpt_shape_config():
    """Notebook 02's `gpu` tiny GPT (its tokenizer's 8,000-token vocabulary from notebook 01's `gpu` profile)."""
    from .lm import tiny_gpt_config

    knobs = PROFILES["02_pretraining-tiny-lm"]["gpu"]
    vocab = PROFILES["01_data-and-tokenizers"]["gpu"]["vocab_size"]
    return tiny_gpt_config(vocab, knobs["n_layer"], knobs["n_embd"], knobs["n_head"], knobs["block_size"])


def build(family: str, small: bool = False, seed: int = 0) -> nn.Module:
    """A randomly initialised MiniLM-shaped classifier ('minilm') or SmolLM2-shaped causal LM ('smollm2')."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "minilm":
        return BertForSequenceClassification(minilm_config(small))
    if family == "smollm2":
        return LlamaForCausalLM(smollm2_config(small))
    raise ValueError(f"unknown family {family!r}")


def gpu_shape(family: str) -> tuple[int, int]:
    """(batch, length) the `gpu` profile trains this family at: 03's for MiniLM, 06's for SmolLM2."""
    knobs = PROFILES[MINILM_NOTEBOOK if family == "minilm" else SMOLLM2_NOTEBOOK]["gpu"]
    return knobs["batch_size"], knobs["max_length"]


def random_rows(
    family: str, vocab: int, rows: int, length: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random token rows; every other row padded in its last quarter, so attention masks matter."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        ids = torch.randint(5, vocab, (length,), generator=gen)
        mask = torch.ones(length, dtype=torch.long)
        if i % 2:
            mask[length - length // 4 :] = 0
        label = torch.tensor(i % 2) if family == "minilm" else ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": label})
    return out


def stack_collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows of equal-length tensors stacked into a batch."""
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def make_random_loader(family: str, model: nn.Module, batch: int, length: int, seed: int = 0):
    """A shuffled loader of two batches of random rows (fit runs through it as many epochs as it needs)."""
    from .loaders import make_loader

    rows = random_rows(family, model.config.vocab_size, 2 * batch, length, seed)
    return make_loader(rows, batch, stack_collate, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    """One line of the table."""

    check: str
    status: str
    seconds: float
    peak_mb: float | None
    detail: str = ""


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class Skip(Exception):
    """Raised by a check that cannot run here; its message is the reason."""


def run_check(name: str, device: torch.device, check: Callable[[], str]) -> Row:
    """Run one check in isolation: its status, its seconds and its peak memory (see the module's docstring)."""
    from .timing import free_memory

    cuda = device.type == "cuda"
    free_memory(device)  # what earlier checks left behind
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    try:
        detail, status = check(), "ok"
    except Skip as exc:
        detail, status = "", f"skipped: {exc}"
    except Exception as exc:  # one failing check must not stop the others
        where = traceback.extract_tb(exc.__traceback__)[-1]
        detail = f"at {Path(where.filename).name}:{where.lineno} ({where.name})"
        status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    if cuda:
        with contextlib.suppress(Exception):  # a CUDA error may leave the device unusable; keep the row
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak: float | None
    if status.startswith("skipped"):
        peak = None
    elif cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _peak_rss_mb() - rss_before
    row = Row(name, status, round(seconds, 2), None if peak is None else round(peak, 1), detail)
    print(format_row(row), flush=True)
    return row


COLUMNS = ("check", "status", "seconds", "peak_mb", "detail")


def format_row(row: Row) -> str:
    peak = "-" if row.peak_mb is None else f"{row.peak_mb:,.0f}"
    return f"{row.check:<34} {row.seconds:>8.1f} {peak:>9}  {row.status}" + (
        f"  [{row.detail}]" if row.detail else ""
    )


def format_table(rows: Sequence[Row], memory_kind: str) -> str:
    header = f"{'check':<34} {'seconds':>8} {'peak MB':>9}  status  [detail]   (peak MB: {memory_kind})"
    return "\n".join([header, "-" * len(header), *(format_row(r) for r in rows)])


def write_table(rows: Sequence[Row], outdir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """OUTDIR/gpu_check.csv and OUTDIR/gpu_check.json (the rows and the machine they ran on)."""
    outdir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = outdir / "gpu_check.csv", outdir / "gpu_check.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    json_path.write_text(json.dumps({"machine": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return csv_path, json_path


# --------------------------------------------------------------------------------------------------------------
# The checks


def _head(model: nn.Module) -> nn.Module:
    """The output layer (a classifier's `classifier`, an LM's `lm_head`), inside any peft wrapper."""
    found = [m for n, m in model.named_modules() if n.split(".")[-1] in ("classifier", "lm_head")]
    if not found:
        raise RuntimeError(f"no classifier or lm_head in {type(model).__name__}")
    return found[-1]


def _watcher(model: nn.Module):
    """A fit callback that notes, at every step, whether accelerate's autocast wrapper is on the model, plus a
    forward hook on the head that notes the dtype it computes in."""
    from .training import Callback, bare_model

    class Watch(Callback):
        def __init__(self) -> None:
            self.wrapped: list[bool] = []
            self.dtypes: list[torch.dtype] = []

        def on_step_begin(self, state) -> None:
            plain = bare_model(state.accelerator, state.model)
            self.wrapped.append(any("_original_forward" in m.__dict__ for m in plain.modules()))

        def hook(self, module, args, output) -> None:
            if torch.is_grad_enabled():
                self.dtypes.append(output.dtype)

    watch = Watch()
    return watch, _head(model).register_forward_hook(watch.hook)


class _Interrupt(Exception):
    """Stops a fit on purpose, to resume it from its checkpoint."""


def _interrupt_at(step: int):
    """A callback that stops the fit at the start of `step` until its `at` is set to None (same fingerprint)."""
    from .training import Callback

    class Interrupt(Callback):
        def __init__(self) -> None:
            self.at: int | None = step

        def on_step_begin(self, state) -> None:
            if state.step == self.at:
                raise _Interrupt

    return Interrupt()


def _train_config(steps: int, precision: str, cpu: bool, **extra: Any):
    from .training import TrainConfig

    return TrainConfig(
        max_steps=steps,
        lr=1e-4,
        warmup=0,
        schedule="constant",
        precision=precision,
        log_every=1,
        progress=False,
        cpu=cpu,
        **extra,
    )


def _expect_autocast(watch, precision: str, steps: int) -> str:
    """Raise unless every step ran under the autocast wrapper with the head in `precision`'s dtype."""
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if len(watch.wrapped) != steps or not all(watch.wrapped):
        raise AssertionError(f"autocast wrapper on {sum(watch.wrapped)} of {steps} steps (N2)")
    wrong = {str(d) for d in watch.dtypes if d != want}
    if wrong:
        raise AssertionError(f"head computed in {sorted(wrong)}, expected {want}")
    return f"autocast on {steps}/{steps} steps, head {str(want).replace('torch.', '')}"


def _losses(history) -> str:
    losses = [row["loss"] for row in history.train]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"losses not finite: {losses}")
    return f"loss {losses[0]:.3f}->{losses[-1]:.3f}"


def precision_available(precision: str, device: torch.device) -> str | None:
    """None where `precision` autocast runs on `device`, else why not."""
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16 is not native on this GPU (a T4 emulates it); the kit trains it in fp16"
        return None
    if precision == "fp16":
        return "accelerate autocasts fp16 on CUDA only (on the CPU it would train in fp32)"
    return None


def fit_checks(family: str, precision: str, settings: Settings) -> list[tuple[str, Callable[[], str]]]:
    """Two `fit`s of one model under `precision` autocast, as two checks (the second reuses the first's model)."""
    from .training import fit

    held: dict[str, Any] = {}

    def one_fit(second: bool) -> str:
        reason = precision_available(precision, settings.device)
        if reason:
            raise Skip(reason)
        if second and "model" not in held:
            raise Skip("the first fit did not finish")
        model = held.pop("model", None) or build(family, settings.small)
        batch, length = settings.shape(family)
        loader = make_random_loader(family, model, batch, length)
        watch, hook = _watcher(model)
        try:
            history = fit(
                model, loader, _train_config(settings.steps, precision, settings.cpu), callbacks=[watch]
            )
        finally:
            hook.remove()
        if not second:
            held["model"] = model
        leftover = {"forward", "_original_forward", "_is_accelerate_prepared"} & set(model.__dict__)
        if leftover:
            raise AssertionError(f"fit left {sorted(leftover)} on the model")
        parts = [f"b{batch} s{length}", _expect_autocast(watch, precision, settings.steps), _losses(history)]
        parts.append(f"{history.tokens_per_s:,.0f} tok/s, fit peak {history.peak_memory_mb:,.0f} MB")
        return "; ".join(parts)

    label = f"{family} {precision} fit"
    return [(f"{label} #1", lambda: one_fit(False)), (f"{label} #2 (same model)", lambda: one_fit(True))]


def adapter_check(quantized: bool, settings: Settings) -> str:
    """LoRA (or QLoRA: a 4-bit base) on the SmolLM2-shaped model: a fit interrupted half way, resumed from its
    checkpoint to the end, under the kit's precision for this device."""
    from .env import pick_precision
    from .peft_utils import build_peft_model
    from .training import fit

    device = settings.device
    if quantized:
        if device.type != "cuda":
            raise Skip("4-bit loading needs a CUDA GPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes not installed")
    precision = pick_precision(device)
    steps = max(settings.steps, 2)
    with tempfile.TemporaryDirectory() as tmp:
        model = build("smollm2", settings.small)
        if quantized:
            model = _load_4bit(model, Path(tmp) / "base")
        lora = build_peft_model(model, "lora", r=LORA_RANK, task="CAUSAL_LM")
        batch, length = settings.shape("smollm2")
        loader = make_random_loader("smollm2", lora, batch, length)
        every = steps // 2
        config = _train_config(
            steps, precision, settings.cpu, checkpoint_dir=Path(tmp) / "ckpt", checkpoint_every=every
        )
        interrupt = _interrupt_at(every)
        try:
            fit(lora, loader, config, callbacks=[interrupt])
            raise AssertionError(f"the interrupt at step {every} did not happen")
        except _Interrupt:
            pass
        interrupt.at = None
        history = fit(lora, loader, config, callbacks=[interrupt])
        if history.resumed_from != every:
            raise AssertionError(f"resumed from {history.resumed_from}, expected step {every}")
        trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    return (
        f"b{batch} s{length} {'fp32' if precision == 'no' else precision}; {trained:,.0f} trained params; resumed at step {every}; "
        f"{_losses(history)}; fit peak {history.peak_memory_mb:,.0f} MB"
    )


def _load_4bit(model: nn.Module, folder: Path) -> nn.Module:
    """The random model saved (fp16) and loaded back 4-bit (NF4) on this process's GPU, prepared for training."""
    from transformers import LlamaForCausalLM

    from .peft_utils import bnb_4bit_config, kbit_device_map, prepare_kbit_model

    model.half().save_pretrained(folder)
    del model
    loaded = LlamaForCausalLM.from_pretrained(
        folder, quantization_config=bnb_4bit_config(), device_map=kbit_device_map()
    )
    return prepare_kbit_model(loaded)


def generation_check(settings: Settings) -> str:
    """Greedy generation from the SmolLM2-shaped model at notebook 19's largest batch (fp32, as 19 loads it)."""
    knobs = PROFILES[GENERATION_NOTEBOOK]["gpu"]
    batch, prompt, new = max(knobs["batch_sizes"]), knobs["prompt_tokens"], knobs["max_new_tokens"]
    if settings.small:
        batch, prompt, new = 2, 8, 4
    model = build("smollm2", settings.small).to(settings.device).eval()
    ids = torch.randint(5, model.config.vocab_size, (batch, prompt), device=settings.device)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
    if out.shape != (batch, prompt + new):
        raise AssertionError(f"generated {tuple(out.shape)}, expected {(batch, prompt + new)}")
    return f"batch {batch}, {prompt} prompt + {new} new tokens"


@dataclass
class Settings:
    """How big the check runs: optimizer steps, `small` toy shapes, the device."""

    steps: int
    small: bool
    device: torch.device

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"

    def shape(self, family: str) -> tuple[int, int]:
        return (2, 16) if self.small else gpu_shape(family)


def machine() -> dict[str, Any]:
    """What ran the check: device, versions, bf16 support."""
    import accelerate
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1),
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
        }
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return info


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def all_checks(settings: Settings) -> list[tuple[str, Callable[[], str]]]:
    checks: list[tuple[str, Callable[[], str]]] = []
    for family in ("minilm", "smollm2"):
        for precision in ("fp16", "bf16"):
            checks += fit_checks(family, precision, settings)
    checks.append(("smollm2 LoRA r8 fit + resume", lambda: adapter_check(False, settings)))
    checks.append(("smollm2 QLoRA 4-bit fit + resume", lambda: adapter_check(True, settings)))
    checks.append(("smollm2 generation (19's batch)", lambda: generation_check(settings)))
    return checks


def gpu_check(
    outdir: str | Path, steps: int = 4, small: bool = False, cpu: bool = False, only: str | None = None
) -> list[Row]:
    """Run every check (those whose name contains `only`, when given), print the table, write it to `outdir`."""
    from .env import seed_everything

    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    settings = Settings(steps, small, device)
    meta = machine() | {"steps": steps, "small": small, "on": str(device)}
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    meta["memory"] = "cuda max allocated" if device.type == "cuda" else "rise of the process's peak RSS"
    (
        build("minilm", small=True),
        build("smollm2", small=True),
    )  # imports (and CUDA's start) left out of the rows
    torch.zeros(1, device=device)
    rows: list[Row] = []
    for name, check in all_checks(settings):
        if only and only not in name:
            continue
        seed_everything(0)
        rows.append(run_check(name, device, check))
        write_table(rows, Path(outdir), meta)  # after every row: a run stopped by a timeout keeps what it did
    print("\n" + format_table(rows, meta["memory"]))
    csv_path, json_path = write_table(rows, Path(outdir), meta)
    print(f"\nwrote {csv_path} and {json_path}")
    return rows


# --------------------------------------------------------------------------------------------------------------
# Memory at the gpu profile's shapes, measured on the CPU (fp32) beside an fp16 estimate for a T4


@dataclass(frozen=True)
class MemoryShape:
    """One distinct shape the notebooks train or generate at under the `gpu` profile."""

    name: str
    notebooks: str
    what: str  # "train" | "lora" | "score" | "generate"
    batch: int
    length: int
    new_tokens: int = 0


def memory_shapes() -> list[MemoryShape]:
    """The distinct `gpu`-profile shapes, read from profiles.py, with the notebooks that use each."""
    gpt = PROFILES["02_pretraining-tiny-lm"]["gpu"]
    cls_b, cls_s = gpu_shape("minilm")
    tag = PROFILES["11_transfer-token-classification"]["gpu"]
    reg = PROFILES["10_regularization"]["gpu"]
    lora_b, lora_s = gpu_shape("smollm2")
    gen = PROFILES[GENERATION_NOTEBOOK]["gpu"]
    score = PROFILES["08_prompting-few-shot"]["gpu"]
    cont = PROFILES["12_continual-learning"]["gpu"]
    align = PROFILES["07_preference-alignment"]["gpu"]
    share = max(
        cont["replay_shares"]
    )  # replay adds old blocks on top of the new ones (continual.replay_counts)
    replay_b = cont["batch_size"] + round(cont["batch_size"] * share / (1 - share))
    return [
        MemoryShape("tiny-gpt", "02, 12", "train", gpt["batch_size"], gpt["block_size"]),
        MemoryShape("tiny-gpt", "12 (replay 0.5)", "train", replay_b, gpt["block_size"]),
        MemoryShape("minilm-cls", "03, 04, 05, 09, 14, 16, 18", "train", cls_b, cls_s),
        MemoryShape("minilm-tagger", "11", "train", tag["batch_size"], tag["max_length"]),
        MemoryShape("minilm-cls", "10", "train", reg["batch_size"], reg["max_length"]),
        MemoryShape("smollm2-lora", "06", "lora", lora_b, lora_s),
        # 07: a chosen and a rejected answer per pair in one batch (the reference's log-probs are cached, no pass)
        MemoryShape("smollm2-lora", "07 (pairs)", "lora", 2 * align["batch_size"], align["max_length"]),
        MemoryShape("smollm2-score", "08", "score", 1, score["max_context_tokens"]),
        MemoryShape(
            "smollm2-generate",
            "19",
            "generate",
            max(gen["batch_sizes"]),
            gen["prompt_tokens"],
            gen["max_new_tokens"],
        ),
    ]


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _memory_model(shape: MemoryShape) -> nn.Module:
    from transformers import BertForTokenClassification, GPT2LMHeadModel

    if shape.name == "tiny-gpt":
        return GPT2LMHeadModel(tiny_gpt_shape_config())
    if shape.name == "minilm-tagger":
        config = minilm_config()
        config.num_labels = 17  # Universal Dependencies' 17 tags
        return BertForTokenClassification(config)
    if shape.name == "minilm-cls":
        return build("minilm")
    model = build("smollm2")
    if shape.what == "lora":
        from .peft_utils import build_peft_model

        model = build_peft_model(model, "lora", r=LORA_RANK, task="CAUSAL_LM")
    return model


def measure_one(shape: MemoryShape) -> dict[str, float]:
    """In this (fresh) process: peak RSS of one fp32 step at `shape` above the RSS before the model was built.

    A training step is forward, backward and an AdamW step (whose two moments are allocated by it); scoring is
    one no-grad forward; generation one greedy `generate` call.
    """
    from .optim import make_optimizer, parameter_groups

    torch.manual_seed(0)
    before = _rss_now_mb()
    model = _memory_model(shape)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (shape.batch, shape.length))
    start = time.perf_counter()
    if shape.what in ("train", "lora"):
        model.train()
        batch: dict[str, torch.Tensor] = {"input_ids": ids}
        if shape.name.startswith("minilm"):
            batch["attention_mask"] = torch.ones_like(ids)
            batch["labels"] = (
                ids % 17 if shape.name == "minilm-tagger" else torch.zeros(shape.batch, dtype=torch.long)
            )
        else:
            batch["labels"] = ids
        optimizer = make_optimizer(
            parameter_groups(model, 0.01, 1e-4), 1e-4, (0.9, 0.999), torch.device("cpu")
        )
        model(**batch).loss.backward()
        optimizer.step()
    elif shape.what == "score":
        with torch.no_grad():
            model.eval()(ids)
    else:
        with torch.no_grad():
            model.eval().generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=shape.new_tokens,
                min_new_tokens=shape.new_tokens,
                do_sample=False,
            )
    return {
        "peak_mb": _peak_rss_mb() - before,
        "seconds": time.perf_counter() - start,
        "params": sum(p.numel() for p in model.parameters()),
        "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _dims(shape: MemoryShape) -> tuple[int, int, int, int, int]:
    """(layers, width, MLP width, key/value width, vocabulary of the logits; 0 for a 2-class head) of `shape`."""
    if shape.name == "tiny-gpt":
        gpt = tiny_gpt_shape_config()
        return gpt.n_layer, gpt.n_embd, 4 * gpt.n_embd, gpt.n_embd, gpt.vocab_size
    if shape.name.startswith("minilm"):
        bert = minilm_config()
        labels = 17 if shape.name == "minilm-tagger" else 0
        return bert.num_hidden_layers, bert.hidden_size, bert.intermediate_size, bert.hidden_size, labels
    llama = smollm2_config()
    kv = llama.hidden_size // llama.num_attention_heads * llama.num_key_value_heads
    return llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size, kv, llama.vocab_size


def fp16_estimate_mb(shape: MemoryShape, params: int, trained: int) -> float:
    """Analytic peak for a T4 under fp16 autocast (about ±30%), from the shape and the parameter counts.

    Training: 16 B per trained parameter (fp32 weight, gradient, two AdamW moments), 4 B per frozen one, plus a 2 B
    fp16 autocast copy of every weight; activations 34·b·s·h per layer (Korthikanti et al., 2022), LoRA adding 3 B
    per value of every adapter's input (an fp16 copy and a dropout mask); logits 14 B per element (fp16, fp32
    copies for the loss and for accelerate's output conversion, a gradient). Scoring and generation run in fp32,
    as the notebooks load the model: 4 B per weight, a KV cache, fp32 logits.
    """
    layers, width, inner, kv, vocab = _dims(shape)
    b, s = shape.batch, shape.length
    if shape.what == "generate":
        cache = 2 * layers * b * (s + shape.new_tokens) * kv * 4
        return (4 * params + cache + 2 * b * s * vocab * 4) / 2**20
    if shape.what == "score":
        return (4 * params + 2 * layers * s * kv * 4 + s * vocab * 4) / 2**20
    states = 16 * trained + 4 * (params - trained) + 2 * params
    per_token = 34 * width
    if shape.what == "lora":
        per_token += 3 * (4 * width + 2 * width + inner)  # inputs of q, k, v, o; gate, up; down
    logits = 14 * b * s * vocab
    return (states + layers * b * s * per_token + logits) / 2**20


def memory_table(outdir: str | Path, only: str | None = None, timeout: float = 1800) -> list[dict]:
    """Measure every distinct shape (those whose name or notebooks contain `only`) in a fresh subprocess (fp32,
    CPU), print the table and write it to OUTDIR/memory.json."""
    rows = []
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    for index, shape in enumerate(memory_shapes()):
        if only and only not in f"{shape.name} {shape.notebooks}":
            continue
        cmd = [sys.executable, "-m", "mfkit.gpucheck", "--measure", str(index)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode:
            raise RuntimeError(f"measuring {shape.name} failed:\n{done.stderr[-2000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        estimate = fp16_estimate_mb(shape, measured["params"], measured["trained"])
        row = asdict(shape) | measured | {"fp16_t4_estimate_mb": round(estimate)}
        print(
            f"{shape.notebooks:<28} {shape.name:<17} {shape.what:<8} b{shape.batch} s{shape.length}"
            f"  cpu fp32 {row['peak_mb']:>7,.0f} MB ({row['seconds']:.0f} s)  t4 fp16 ≈ {row['fp16_t4_estimate_mb']:,} MB",
            flush=True,
        )
        rows.append(row)
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")  # after every shape
    return rows


# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of `python -m mfkit.gpucheck` and `mfkit gpu-check`."""
    parser = parser or argparse.ArgumentParser(prog="python -m mfkit.gpucheck", description=__doc__)
    parser.add_argument("outdir", metavar="OUTDIR", nargs="?", help="folder for gpu_check.csv/.json")
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per fit (default: 4; at least 2)"
    )
    parser.add_argument("--small", action="store_true", help="toy models and shapes (tests, a quick look)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument("--only", metavar="TEXT", help="run only the checks whose name contains TEXT")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--memory", action="store_true", help="measure one fp32 step per gpu-profile shape on the CPU instead"
    )
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one shape, in a fresh process
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run the check (or the memory measurement); 0 when nothing failed."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    with _threads(args.threads):
        if args.measure is not None:
            print(json.dumps(measure_one(memory_shapes()[args.measure])))
            return 0
        if not args.outdir:
            print("give OUTDIR, the folder the table is written to", file=sys.stderr)
            return 2
        if args.memory:
            memory_table(args.outdir, args.only)
            return 0
        rows = gpu_check(args.outdir, max(args.steps, 2), args.small, args.cpu, args.only)
    return 1 if any(r.status.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
