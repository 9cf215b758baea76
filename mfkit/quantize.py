"""Quantization: the int8/int4 number formats by hand, and the library calls that shrink a model for CPU inference.

The teaching half quantizes a tensor the way every int8 scheme does, q = clamp(round(x / s) + z, qmin, qmax), per
tensor or per output channel, symmetric or affine, so a notebook can show the error of each. The practical half
calls the libraries: PyTorch's dynamic int8 quantization of the linear layers (`torch.ao.quantization`, int8
weights, activation scales computed at run time) and torchao's weight-only int8/int4 formats; it counts the bytes
of the linear weights, and saves an int8 classifier as TorchScript, which reloads with torch alone.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .errors import MfkitError, check_choice, check_positive
from .inference import size_on_disk_mb
from .paths import atomic_folder, require_artifact
from .timing import synchronize

QUANTIZED_FOLDER = "17-quantized"
QUANTIZED_NOTEBOOK = "17_quantization"
SCRIPT_NAME = "model.pt"
CARD_NAME = "mfkit.json"

# --------------------------------------------------------------------------------------------------------------
# The number formats, by hand
# --------------------------------------------------------------------------------------------------------------


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The signed integer range used with `bits` bits: [-2^(b-1), 2^(b-1)-1], or symmetric [-(2^(b-1)-1), 2^(b-1)-1]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise MfkitError(f"bits={bits!r} must be a whole number from 2 to 16.", "pass e.g. bits=8 or bits=4.")
    top = 2 ** (bits - 1) - 1
    return (-top if symmetric else -top - 1), top


def _reduce_dims(x: torch.Tensor, channel_dim: int | None) -> tuple[int, ...]:
    if channel_dim is None:
        return tuple(range(x.dim()))
    if not -x.dim() <= channel_dim < x.dim():
        raise MfkitError(
            f"channel_dim={channel_dim} does not exist in a tensor of shape {tuple(x.shape)}.",
            "pass channel_dim=0 (one scale per output row of a weight matrix) or None (one scale per tensor).",
        )
    channel_dim %= x.dim()
    return tuple(d for d in range(x.dim()) if d != channel_dim)


def affine_qparams(
    x: torch.Tensor, bits: int = 8, symmetric: bool = False, channel_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s and zero point z that map the range of `x` onto `bits`-bit integers.

    Affine: the range [min(x, 0), max(x, 0)] is stretched over [qmin, qmax], s = (hi - lo) / (qmax - qmin) and
    z = qmin - round(lo / s), so the real 0 is exactly representable. Symmetric: s = max|x| / qmax and z = 0.
    `channel_dim=None` gives one (s, z) for the tensor; `channel_dim=0` one per row (per output channel).
    """
    if not x.is_floating_point() or x.numel() == 0:
        raise MfkitError(
            "affine_qparams needs a non-empty float tensor.", "pass a weight or activation tensor."
        )
    qmin, qmax = int_range(bits, symmetric)
    dims = _reduce_dims(x, channel_dim)
    x = x.detach().float()
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        scale = (x.abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(eps)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo = x.amin(dim=dims, keepdim=True).clamp_max(0)
    hi = x.amax(dim=dims, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8, symmetric: bool = False
) -> torch.Tensor:
    """q = clamp(round(x / s) + z, qmin, qmax), as int32 integers (int8 storage holds them for bits <= 8)."""
    qmin, qmax = int_range(bits, symmetric)
    return (torch.round(x.detach().float() / scale) + zero).clamp(qmin, qmax).to(torch.int32)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x_hat = s * (q - z): the real number each integer stands for."""
    return scale * (q.float() - zero.float())


def fake_quantize(
    x: torch.Tensor, bits: int = 8, symmetric: bool = False, channel_dim: int | None = None
) -> torch.Tensor:
    """`x` quantized and dequantized again: what the model computes with after quantization."""
    scale, zero = affine_qparams(x, bits, symmetric, channel_dim)
    return dequantize_affine(quantize_affine(x, scale, zero, bits, symmetric), scale, zero)


# --------------------------------------------------------------------------------------------------------------
# Quantizing a model with the libraries
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """torch.ao's eager quantization warns that it is deprecated in favour of torchao; it still works in torch 2.x."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=FutureWarning)
        yield


def quantize_dynamic_int8(model: nn.Module, per_channel: bool = False) -> nn.Module:
    """A copy of `model` whose `nn.Linear` layers hold int8 weights and quantize their inputs at run time (CPU).

    Weights get one scale per tensor (symmetric int8), or one per output row with `per_channel=True`; each
    activation tensor gets its own scale computed from its range on every call (dynamic quantization).
    """
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise MfkitError("The model has no nn.Linear layer to quantize.", "pass a transformer or an MLP.")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise MfkitError(
            "Dynamic int8 quantization runs on the CPU only.", "move the model first: model.to('cpu')."
        )
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with _quiet_deprecations():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: qconfig}, dtype=torch.qint8)


def quantize_weight_only(model: nn.Module, bits: int = 8, group_size: int = 32) -> nn.Module:
    """A copy of `model` with torchao weight-only int8 (one scale per row) or int4 (one scale per `group_size`).

    Activations stay float; the weights are dequantized inside each matrix multiply. Needs `pip install torchao`.
    """
    check_choice("bits", bits, (4, 8))
    check_positive("group_size", group_size)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError as exc:
        raise MfkitError(
            f"torchao cannot be imported ({exc}).", "pip install torchao (a build matching your torch)."
        ) from exc
    config = (
        Int8WeightOnlyConfig()
        if bits == 8
        else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    )
    quantized = copy.deepcopy(model).eval()
    with _quiet_deprecations():
        quantize_(quantized, config)
    return quantized


def tensor_bytes(t: Any) -> int:
    """Bytes a tensor's data takes: int8 values plus their scales and zero points for a quantized tensor."""
    if isinstance(t, torch.Tensor) and t.is_quantized:
        extra = 0
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = sum(
                x.numel() * x.element_size()
                for x in (t.q_per_channel_scales(), t.q_per_channel_zero_points())
            )
        else:
            extra = 8 + 8  # one float64 scale and one int64 zero point
        return t.numel() * t.element_size() + extra
    if hasattr(t, "__tensor_flatten__"):  # a torchao tensor subclass: its inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def _linear_weights(model: nn.Module) -> Iterator[Any]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for module in model.modules():
        if isinstance(module, DynamicLinear):
            yield module.weight()
        elif isinstance(module, nn.Linear):
            yield module.weight


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weight matrices of every linear layer (float, int8 or int4, with their scales), no biases."""
    with _quiet_deprecations():
        return sum(tensor_bytes(w) for w in _linear_weights(model))


def linear_weight_count(model: nn.Module) -> int:
    """Number of weights in the linear layers' matrices (what the quantized layers store)."""
    with _quiet_deprecations():
        return sum(w.numel() for w in _linear_weights(model))


def state_dict_mb(model: nn.Module) -> float:
    """Megabytes of `torch.save(model.state_dict())`: the size on disk of the weights alone, for any variant."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.pt"
        with _quiet_deprecations():
            torch.save(model.state_dict(), path)
        return size_on_disk_mb(path)


# --------------------------------------------------------------------------------------------------------------
# Saving an int8 classifier that reloads without the kit
# --------------------------------------------------------------------------------------------------------------


class ScriptedClassifier(nn.Module):
    """A TorchScript classifier called like a transformers one: `model(input_ids=..., attention_mask=...).logits`.

    The traced graph was recorded at one sequence length, so inputs are padded (or cut) to `max_length` first.
    """

    def __init__(self, scripted: torch.jit.ScriptModule, max_length: int, pad_id: int = 0) -> None:
        super().__init__()
        self.scripted = scripted
        self.max_length = max_length
        self.pad_id = pad_id

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> SimpleNamespace:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = self.max_length - input_ids.shape[1]
        if extra > 0:
            input_ids = nn.functional.pad(input_ids, (0, extra), value=self.pad_id)
            attention_mask = nn.functional.pad(attention_mask, (0, extra), value=0)
        ids, mask = input_ids[:, : self.max_length], attention_mask[:, : self.max_length]
        return SimpleNamespace(logits=self.scripted(ids, mask)[0])


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    target: str | Path,
    max_length: int,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Trace `model` at `max_length` tokens to TorchScript and save it with its tokenizer, replacing `target` whole.

    The folder holds `model.pt` (load with `torch.jit.load`, torch alone), the tokenizer files
    (`AutoTokenizer.from_pretrained`) and `mfkit.json` (the length and labels). Written beside `target` and
    renamed into place, so an interrupted save never leaves a half-written model.
    """
    check_positive("max_length", max_length)
    example = tokenizer(
        ["a"], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    inputs = (example["input_ids"], example["attention_mask"])
    config = getattr(model, "config", None)
    labels = dict(getattr(config, "id2label", {}) or {})
    return_dict = getattr(config, "return_dict", None)
    model.eval()
    try:
        if config is not None:
            config.return_dict = False  # tracing needs tuples, not ModelOutput objects
        with _quiet_deprecations(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            scripted = torch.jit.trace(model, inputs, strict=False)
    finally:
        if config is not None:
            config.return_dict = return_dict
    with atomic_folder(Path(target)) as staging:
        scripted.save(str(staging / SCRIPT_NAME))
        tokenizer.save_pretrained(staging)
        info = {
            "max_length": max_length,
            "id2label": {str(k): v for k, v in labels.items()},
            **dict(card or {}),
        }
        (staging / CARD_NAME).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return Path(target)


def load_quantized(folder: str | Path) -> tuple[ScriptedClassifier, Any, dict[str, Any]]:
    """The saved int8 classifier (callable like a transformers model), its tokenizer and its card.

    Equivalent without mfkit: `torch.jit.load(folder / "model.pt")(input_ids, attention_mask)[0]` on inputs padded
    to the card's `max_length`, with `AutoTokenizer.from_pretrained(folder)`.
    """
    from transformers import AutoTokenizer

    folder = require_artifact(Path(folder), QUANTIZED_NOTEBOOK)
    card = json.loads(require_artifact(folder / CARD_NAME, QUANTIZED_NOTEBOOK).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    scripted = torch.jit.load(
        str(require_artifact(folder / SCRIPT_NAME, QUANTIZED_NOTEBOOK)), map_location="cpu"
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ScriptedClassifier(scripted, card["max_length"], pad_id).eval(), tokenizer, card


# --------------------------------------------------------------------------------------------------------------
# A causal LM before and after
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def timed_generation(
    model: nn.Module, tokenizer: Any, prompt: str, new_tokens: int, warmup: int = 1
) -> tuple[float, str]:
    """Tokens per second of greedy generation of exactly `new_tokens` tokens after `prompt`, and the text generated.

    One sequence, where the model's parameters are; `warmup` short generations run first, untimed. The clock is
    read after the device has finished (`timing.synchronize`), not when the work was queued.
    """
    check_positive("new_tokens", new_tokens)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in tokenizer(prompt, return_tensors="pt").items()}
    settings = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    model.eval()
    for _ in range(warmup):
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **settings)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    synchronize(device)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1] :]
    return len(new) / seconds, tokenizer.decode(new, skip_special_tokens=True)
