"""Parameter-efficient fine-tuning (PEFT) with the `peft` library: build, measure, save, merge.

Full fine-tuning updates every weight; PEFT methods freeze the pretrained model and train a small add-on:

    lora     W = W0 + (alpha / r) B A, B (d x r) starts at zero, A (r x k) random     (Hu et al., 2021)
    adalora  W = W0 + P diag(E) Q in SVD form; the rank budget moves to important matrices (Zhang et al., 2023)
    ia3      learned vectors that rescale keys, values and feed-forward activations     (Liu et al., 2022)
    prefix   trainable key/value vectors prepended in every attention layer            (Li & Liang, 2021)
    prompt   trainable input embeddings prepended to the text                           (Lester et al., 2021)

`build_peft_model` wraps a transformers model for one of them with target modules that suit its family (BERT-like
encoders, Llama-like and GPT-2 decoders); a classifier head stays trainable through `modules_to_save`. Then:
`parameter_report` (how much trains), `training_state_bytes` (gradients + AdamW moments of what trains),
`saved_size` (an adapter or a full checkpoint on disk), `merge_check` (merged and unmerged logits agree),
`AdaLoraBudget` (the rank reallocation AdaLoRA needs inside the training loop), `qlora_support` / `bnb_4bit_config`
/ `kbit_device_map` / `prepare_kbit_model` (4-bit loading where a CUDA GPU and bitsandbytes exist).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn

from .env import pick_precision
from .errors import MfkitError, check_choice, check_positive
from .paths import atomic_folder
from .timing import model_inputs
from .training import Callback, TrainState

METHODS = ("lora", "adalora", "ia3", "prefix", "prompt")
TASKS = ("SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION")

# Families of architectures that share module names, by `config.model_type`.
FAMILIES: dict[str, tuple[str, ...]] = {
    "bert": ("bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"),
    "llama": ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "smollm3"),
    "gpt2": ("gpt2",),
}

# Where each method attaches, per family. LoRA: every linear layer of a block, as QLoRA recommends (for a BERT
# encoder `dense` names the attention output, both feed-forward layers and the pooler; the LoRA paper's original
# choice, `query` and `value` only, is one `target_modules=` away). IA3: keys, values and the feed-forward output,
# whose *input* it rescales (the `feedforward` entry).
TARGETS: dict[str, dict[str, list[str]]] = {
    "bert": {
        "lora": ["query", "key", "value", "dense"],
        "ia3": ["key", "value", "output.dense"],
        "ia3_feedforward": ["output.dense"],
    },
    "llama": {
        "lora": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "ia3": ["k_proj", "v_proj", "down_proj"],
        "ia3_feedforward": ["down_proj"],
    },
    "gpt2": {
        "lora": ["c_attn", "c_proj", "c_fc"],
        "ia3": ["c_attn", "mlp.c_proj"],
        "ia3_feedforward": ["mlp.c_proj"],
    },
}
HEAD_NAMES = ("classifier", "score")
DEFAULT_ALPHA = 8.0  # LoRA's alpha, the same for every rank


def model_family(model: nn.Module) -> str:
    """'bert', 'llama' or 'gpt2' for architectures mfkit knows the module names of, else the raw `model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or ""
    for family, types in FAMILIES.items():
        if model_type in types:
            return family
    return model_type


def default_targets(model: nn.Module, method: str) -> tuple[list[str] | None, list[str] | None]:
    """(target_modules, feedforward_modules) of `method` for `model`'s family; (None, None) for prompt methods.

    For a family mfkit does not know, both are None and `peft` falls back on its own table (it raises if the
    architecture is not in it either; then pass `target_modules=` yourself).
    """
    check_choice("method", method, METHODS)
    if method in ("prefix", "prompt"):
        return None, None
    table = TARGETS.get(model_family(model))
    if table is None:
        return None, None
    if method == "ia3":
        return list(table["ia3"]), list(table["ia3_feedforward"])
    return list(table["lora"]), None


def infer_task(model: nn.Module) -> str:
    """The peft task type of a transformers model, read from its class name."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task-head modules a classifier has (`classifier` for BERT, `score` for decoders)."""
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def peft_config(
    model: nn.Module,
    method: str,
    *,
    task: str | None = None,
    r: int = 8,
    alpha: float = DEFAULT_ALPHA,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    num_virtual_tokens: int = 10,
    total_steps: int | None = None,
    **extra: Any,
):
    """The `peft` config of `method` for `model` (see `build_peft_model` for the arguments)."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    check_choice("method", method, METHODS)
    task = task or infer_task(model)
    check_choice("task", task, TASKS)
    check_positive("r", r)
    if modules_to_save is None and task in ("SEQ_CLS", "TOKEN_CLS"):
        modules_to_save = head_modules(model)  # the new head is random: it must train, whatever the method
    save = list(modules_to_save) if modules_to_save else None
    targets, feedforward = default_targets(model, method)
    if target_modules is not None:
        targets, feedforward = target_modules, None
    feedforward = extra.pop("feedforward_modules", feedforward)
    common = {"task_type": task, **extra}
    if method == "lora":
        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            modules_to_save=save,
            **common,
        )
    if method == "adalora":
        if not total_steps:
            raise MfkitError(
                "AdaLoRA reallocates its rank budget on a schedule over the whole run, so it needs its length.",
                "pass total_steps= (the max_steps of training).",
            )
        check_positive("total_steps", total_steps)
        settings = {
            "init_r": math.ceil(1.5 * r),
            "target_r": r,
            "tinit": total_steps // 10,
            "tfinal": total_steps // 5,
            "deltaT": max(1, total_steps // 50),
        }
        settings.update({k: common.pop(k) for k in list(common) if k in settings})
        if settings["tinit"] >= total_steps - settings["tfinal"]:
            raise MfkitError(
                f"AdaLoRA with total_steps={total_steps}, tinit={settings['tinit']}, tfinal={settings['tfinal']} "
                "has no steps left for reallocating ranks.",
                "pass smaller tinit= / tfinal=, or train for more steps.",
            )
        return AdaLoraConfig(
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            modules_to_save=save,
            total_step=total_steps,
            **settings,
            **common,
        )
    if method == "ia3":
        return IA3Config(
            target_modules=targets, feedforward_modules=feedforward, modules_to_save=save, **common
        )
    check_positive("num_virtual_tokens", num_virtual_tokens)
    config_class = PrefixTuningConfig if method == "prefix" else PromptTuningConfig
    return config_class(num_virtual_tokens=num_virtual_tokens, modules_to_save=save, **common)


def _forward_with_past_key_values(self: nn.Module, *args: Any, past_key_values: Any = None, **kwargs: Any):
    """The module's own `forward`, taking the prefix under its old name `past_key_values` and passing it as `cache`."""
    if past_key_values is not None:
        kwargs["cache"] = past_key_values
    return type(self).forward(self, *args, **kwargs)


def accept_past_key_values(model: nn.Module) -> list[str]:
    """Let peft's prefix tuning hand its prefix to a backbone whose `forward` calls it `cache`; return their names.

    transformers 5.25 renamed the `past_key_values` argument of its models' `forward` to `cache` (the old name
    still works, with a deprecation warning, but is gone from the signature). For a classifier, peft 0.21 passes
    the prefix to the backbone (BERT's `bert`) after looking for `past_key_values` in the signature of its
    `forward`, and otherwise refuses prefix tuning ("Model does not support past key values ..."). Each direct
    child of `model` that takes `cache` only gets, on this instance, a `forward` that also takes `past_key_values`
    and passes it on as `cache` (a bound method: a deep copy of the model stays bound to the copy). Nothing changes
    on older transformers, or for decoders, whose top-level `forward` peft calls with the old name.
    """
    changed = []
    for name, module in model.named_children():
        params = inspect.signature(module.forward).parameters
        if "cache" in params and "past_key_values" not in params:
            module.forward = MethodType(_forward_with_past_key_values, module)
            changed.append(name)
    return changed


def build_peft_model(
    model: nn.Module,
    method: str,
    *,
    task: str | None = None,
    r: int = 8,
    alpha: float = DEFAULT_ALPHA,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    num_virtual_tokens: int = 10,
    total_steps: int | None = None,
    **extra: Any,
):
    """Freeze `model` and wrap it with a `method` adapter ('lora', 'adalora', 'ia3', 'prefix' or 'prompt').

    - `task`: the peft task type ('SEQ_CLS', 'CAUSAL_LM', ...), read from the model's class when None.
    - `r`, `alpha`, `dropout`: LoRA's rank, its scale alpha/r and the dropout on its input. alpha stays fixed
      when r changes, as in the LoRA paper: under Adam the product B A grows roughly in proportion to r, and the
      factor 1/r offsets that, so one learning rate serves every rank. AdaLoRA starts at rank ceil(1.5 r) per
      matrix and prunes to an average of r (`init_r=`, `target_r=` in `extra` override that).
    - `target_modules`: which linear layers get adapters; None picks the family's defaults (`default_targets`).
    - `modules_to_save`: modules trained in full and saved with the adapter; None keeps a classifier head
      (`classifier` / `score`) trainable, since it starts random.
    - `num_virtual_tokens`: length of the learned prefix (prefix tuning) or soft prompt (prompt tuning).
    - `total_steps`: AdaLoRA's schedule length (required for it); train it with `AdaLoraBudget` as a callback.
    - `extra`: any further field of the peft config class (e.g. `tinit=`, `prefix_projection=True`).
    """
    from peft import get_peft_model

    config = peft_config(
        model,
        method,
        task=task,
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        num_virtual_tokens=num_virtual_tokens,
        total_steps=total_steps,
        **extra,
    )
    if method == "prefix":
        accept_past_key_values(model)
    try:
        with (
            warnings.catch_warnings()
        ):  # transformers deprecates an attribute peft still reads; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:
        if "target_modules" not in str(exc) and "Target modules" not in str(exc):
            raise
        raise MfkitError(
            f"peft could not place {method} adapters in {type(model).__name__}: {exc}",
            "pass target_modules= with names of its linear layers (see [n for n, _ in model.named_modules()]).",
        ) from exc


# --------------------------------------------------------------------------------------------------------------
# Measuring what trains and what it costs


def parameter_report(model: nn.Module, reference: int | None = None) -> dict[str, float]:
    """Trainable and total parameter counts, and the trainable share in % of `reference` (default: the total).

    Pass the parameter count of the plain model as `reference` to compare variants against the same number (a
    wrapped model also counts its adapters and the copy of a saved head).
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_pct": 100 * trainable / (reference or total)}


def training_state_bytes(model: nn.Module, moments: int = 2, bytes_per_value: int = 4) -> int:
    """Memory that training adds for each trainable parameter: its gradient plus the optimizer's moments.

    AdamW keeps two moments (m and v) per parameter, so with fp32 this is 4 + 8 = 12 bytes per trainable
    parameter. Frozen weights need neither, which is where PEFT saves memory; activations (which grow with batch
    and sequence length, and which every method needs for the backward pass) are not counted.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * (1 + moments) * bytes_per_value


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def saved_size(model: nn.Module, target: str | Path | None = None) -> int:
    """Bytes `model.save_pretrained` writes: only the adapter (and saved modules) for a peft model, every weight
    for a plain transformers model. With `target` None the files go to a temporary folder that is removed.
    Under `accelerate launch`, call it on every process: the main one writes `target` (see `paths.atomic_folder`),
    and every process measures it once it is in place."""
    if target is not None:
        with atomic_folder(target) as staging:
            model.save_pretrained(staging)
        return folder_bytes(target)
    with tempfile.TemporaryDirectory(prefix="mfkit-size-") as folder:
        model.save_pretrained(folder)
        return folder_bytes(folder)


# --------------------------------------------------------------------------------------------------------------
# Merging


@dataclass
class MergeCheck:
    """The outcome of `merge_check`: the largest logit difference and the merged plain model."""

    max_abs_diff: float
    merged: nn.Module
    parameters_before: int
    parameters_after: int


@torch.no_grad()
def merge_check(
    peft_model: nn.Module, batch: Mapping[str, torch.Tensor], copy_model: bool = True
) -> MergeCheck:
    """Merge a LoRA-style adapter into its base weights and compare logits on `batch` (labels are ignored).

    `merge_and_unload` computes W0 + (alpha/r) B A once and puts plain linear layers back, so the merged model
    has the base model's size and speed. Merging rewrites the wrapped model, so by default it works on a copy and
    `peft_model` stays usable. Returns the max |logit difference| and the merged model.
    """
    if not hasattr(peft_model, "merge_and_unload"):
        raise MfkitError(
            f"{type(peft_model).__name__} has no adapter that can be merged.",
            "merge LoRA, AdaLoRA or IA3 models; prefix and prompt tuning add inputs, not weights, and cannot merge.",
        )
    source = copy.deepcopy(peft_model) if copy_model else peft_model
    device = next(source.parameters()).device
    inputs = model_inputs(batch, device)
    was_training = source.training
    source.eval()
    before = source(**inputs).logits.float()
    parameters_before = sum(p.numel() for p in source.parameters())
    merged = source.merge_and_unload()
    merged.eval()
    after = merged(**inputs).logits.float()
    merged.train(was_training)
    return MergeCheck(
        max_abs_diff=float((before - after).abs().max()),
        merged=merged,
        parameters_before=parameters_before,
        parameters_after=sum(p.numel() for p in merged.parameters()),
    )


# --------------------------------------------------------------------------------------------------------------
# AdaLoRA inside `fit`


def gradients_finite(parameters: Sequence[nn.Parameter] | Any) -> bool:
    """True when every gradient of `parameters` that exists is finite (one host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


class AdaLoraBudget(Callback):
    """Calls AdaLoRA's `update_and_allocate` after each optimizer step, while the gradients still exist.

    AdaLoRA scores each singular value by |value x gradient| (smoothed over steps) and, on its schedule, zeroes
    the least important ones until the average rank is `target_r`. That needs the gradients of the step, which
    `fit` clears right after `optimizer.step()`; so the callback hooks into the optimizer's step itself.

    Under fp16 the loss scaler skips a step whose gradients overflowed, but the fused AdamW kernel is still called
    (it skips the update itself), so the hook runs with infinite gradients; fed to the importance scores, 0 x inf
    = nan would stay there for good. Such steps are skipped here too. Where the fused kernel receives gradients
    still multiplied by the loss scale (no `grad_clip`, which unscales them first), they are divided by it before
    scoring. (The importance scores are not part of `fit`'s checkpoint: a resumed AdaLoRA run starts them afresh.)
    """

    def __init__(self) -> None:
        self._handle: Any = None
        self._state: TrainState | None = None
        self._model: Any = None
        self.skipped_steps: list[int] = []  # steps whose gradients were not finite

    def on_train_begin(self, state: TrainState) -> None:
        model = state.accelerator.unwrap_model(state.model)
        if not hasattr(getattr(model, "base_model", None), "update_and_allocate"):
            raise MfkitError(
                "AdaLoraBudget was given a model without AdaLoRA adapters.",
                "use it only for method='adalora'.",
            )
        self._state, self._model = state, model
        optimizer = getattr(
            state.optimizer, "optimizer", state.optimizer
        )  # the torch optimizer inside accelerate's
        self._handle = optimizer.register_step_post_hook(self.allocate)

    def allocate(self, optimizer: torch.optim.Optimizer | None = None, *_: Any) -> None:
        """Update AdaLoRA's importance scores and rank budget from this step's gradients (finite ones only)."""
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        if not gradients_finite(trainable):
            self.skipped_steps.append(self._state.step)
            return
        scale = getattr(
            optimizer, "grad_scale", None
        )  # set by GradScaler for fused optimizers, during step()
        if scale is not None:
            for p in trainable:
                if p.grad is not None:
                    p.grad.div_(scale.to(p.grad.device))  # fit zeroes the gradients right after this step
        self._model.base_model.update_and_allocate(self._state.step)

    def on_train_end(self, state: TrainState) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def adalora_ranks(peft_model: nn.Module, adapter: str = "default") -> dict[str, int]:
    """The rank each AdaLoRA matrix keeps, by module name: its allocated rank `init_r` until the budget schedule
    has pruned it, then the number of singular values the importance ranking kept (the config's rank_pattern)."""
    pattern = {}
    for key, mask in (peft_model.peft_config[adapter].rank_pattern or {}).items():
        module = key.replace(f".{adapter}", "").removesuffix(".lora_E")
        pattern[module] = int(torch.as_tensor(mask).sum())
    ranks = {}
    for name, module in peft_model.base_model.model.named_modules():
        values = getattr(module, "lora_E", None)
        if isinstance(values, nn.ParameterDict) and adapter in values:
            ranks[name] = pattern.get(name, int(values[adapter].shape[0]))
    return ranks


# --------------------------------------------------------------------------------------------------------------
# 4-bit loading (QLoRA)


def qlora_support() -> tuple[bool, str]:
    """(True, '') where 4-bit loading works (a CUDA GPU and bitsandbytes); else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, (
            "4-bit (QLoRA) loading needs a CUDA GPU: bitsandbytes' 4-bit kernels run there; this "
            "machine has none, so the 4-bit run is skipped."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "4-bit (QLoRA) loading needs the bitsandbytes package: pip install bitsandbytes."
    return True, ""


def dtype_of_precision(precision: str) -> torch.dtype:
    """The torch dtype of an `accelerate` precision name: bf16 -> bfloat16, fp16 -> float16, no -> float32."""
    check_choice("precision", precision, ("bf16", "fp16", "no"))
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision]


def bnb_4bit_config(compute_dtype: torch.dtype | None = None):
    """QLoRA's quantization: NF4 weights, double quantization of the scales, compute in the kit's precision.

    The compute dtype follows `env.pick_precision`: bf16 only where the GPU has it natively (Ampere and newer),
    fp16 on a T4 (whose bf16 is a slow emulation that `torch.cuda.is_bf16_supported()` still counts).
    """
    from transformers import BitsAndBytesConfig

    if compute_dtype is None:
        compute_dtype = dtype_of_precision(pick_precision("cuda" if torch.cuda.is_available() else "cpu"))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def kbit_device_map() -> dict[str, int | str]:
    """`device_map` for loading a 4-bit model onto this process's own GPU.

    `{"": 0}` would put every process's copy on cuda:0 under `accelerate launch`; the local process index is the
    GPU accelerate gives each process (0 in a single process). On a machine without CUDA: the CPU.
    """
    if not torch.cuda.is_available():
        return {"": "cpu"}
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def prepare_kbit_model(model: nn.Module) -> nn.Module:
    """peft's `prepare_model_for_kbit_training` (frozen base, fp32 norms, input gradients), without turning on
    gradient checkpointing: peft's default enables it (reentrant), which costs ~30% more compute and is not
    needed for a 135M-parameter model; use `TrainConfig(gradient_checkpointing=True)` where memory is short."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
