"""Knowledge distillation: a small student learns from a large teacher's softened predictions.

    loss = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

`alpha` is the weight of the soft (distillation) term, `1 - alpha` that of the hard labels: alpha = 0 is plain
cross-entropy, alpha = 1 learns from the teacher alone. The T^2 factor (Hinton et al., 2015) keeps the soft
term's gradients the same size whatever T: they shrink like 1/T^2 as T grows.

    layer_selected_student(teacher, [0, 2, 4])  a shallower copy: embeddings, layers 0/2/4, pooler and head
    with_teacher_logits(dataset, teacher, ...)   the teacher's logits stored beside each row, computed once
    DistillationLoss(temperature, alpha)         a `fit(..., loss_fn=...)` that reads them from the batch
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import MfkitError, check_positive
from .loaders import make_loader, pad_collate
from .metrics import predict_logits

TEACHER_COLUMN = "teacher_logits"


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise MfkitError(
            f"alpha={alpha!r} must be a number in [0, 1] (the weight of the soft, distillation term).",
            "pass e.g. alpha=0.5; 0 trains on the hard labels only, 1 on the teacher only.",
        )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Hinton's distillation loss, averaged over the batch (see the module docstring for the formula).

    The soft term is the KL divergence from the teacher's softened distribution to the student's: the
    cross-entropy against the soft targets minus the teacher's entropy, a constant for the student, so it has
    the same gradients and is zero when the student matches the teacher exactly.
    """
    check_positive("temperature", temperature)
    _check_alpha(alpha)
    if student_logits.shape != teacher_logits.shape:
        raise MfkitError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ.",
            "give the student the teacher's number of classes (num_labels), and cache the teacher's logits "
            "for the same rows.",
        )
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0:
        return hard
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.to(student_logits.dtype) / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * hard + alpha * t * t * soft


class DistillationLoss:
    """`fit(..., loss_fn=DistillationLoss(T, alpha))`: the KD loss of a batch that carries the teacher's logits.

    The logits come from the batch's `teacher_logits` column (see `with_teacher_logits`: computed once, no teacher
    forward per step); when it is absent and a `teacher` model is given, the teacher runs on the batch (in eval
    mode, without gradients). Everything else in the batch except `labels` goes to the student.
    """

    def __init__(
        self, temperature: float = 2.0, alpha: float = 0.5, teacher: nn.Module | None = None
    ) -> None:
        check_positive("temperature", temperature)
        _check_alpha(alpha)
        self.temperature, self.alpha, self.teacher = temperature, alpha, teacher

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", TEACHER_COLUMN)}
        student = model(**inputs).logits
        teacher = batch.get(TEACHER_COLUMN)
        if teacher is None:
            if self.teacher is None:
                raise MfkitError(
                    f"The batch has no {TEACHER_COLUMN!r} column and no teacher model was given.",
                    "add the column with with_teacher_logits(...), or pass DistillationLoss(..., teacher=model).",
                )
            self.teacher.eval()
            with torch.no_grad():
                teacher = self.teacher.to(student.device)(**inputs).logits
        return kd_loss(student.float(), teacher.float(), batch["labels"], self.temperature, self.alpha)

    def __repr__(self) -> str:
        return f"DistillationLoss(temperature={self.temperature}, alpha={self.alpha})"


def teacher_collate(pad_id: int) -> Callable[[Sequence[dict]], dict[str, torch.Tensor]]:
    """`loaders.pad_collate` for rows that carry `teacher_logits`: the token fields are padded per batch, the
    logits (one per class, not per token) are stacked as they are."""
    pad = pad_collate(pad_id)

    def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = pad([{k: v for k, v in row.items() if k != TEACHER_COLUMN} for row in rows])
        if TEACHER_COLUMN in rows[0]:
            batch[TEACHER_COLUMN] = torch.tensor([row[TEACHER_COLUMN] for row in rows], dtype=torch.float32)
        return batch

    return collate


def with_teacher_logits(dataset: Any, teacher: nn.Module, pad_id: int, batch_size: int = 64) -> Any:
    """`dataset` (tokenized, with `labels`) plus a `teacher_logits` column: the teacher's logits for each row.

    One pass of the teacher over the rows in their order, instead of one teacher forward per training step (and
    per epoch): the teacher is frozen, so its logits never change. Rows are padded per batch, as in training.
    """
    if TEACHER_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(TEACHER_COLUMN)
    loader = make_loader(dataset, batch_size, pad_collate(pad_id), shuffle=False)
    logits, _ = predict_logits(teacher, loader)
    return dataset.add_column(TEACHER_COLUMN, logits.astype("float32").tolist())


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ModuleList of the model's transformer blocks (one per `config.num_hidden_layers`)."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n
    ]
    if n is None or len(found) != 1:
        raise MfkitError(
            f"Cannot find the one list of {n} transformer blocks in {type(model).__name__}.",
            "use an encoder whose config has num_hidden_layers and whose blocks sit in one ModuleList "
            "(BERT, MiniLM, RoBERTa, DistilBERT, ...).",
        )
    return found[0]


def every_other_layer(num_layers: int) -> list[int]:
    """Layers 0, 2, 4, ...: the student of half the depth that DistilBERT (Sanh et al., 2019) initialised."""
    check_positive("num_layers", num_layers)
    return list(range(0, num_layers, 2))


def layer_selected_student(teacher: nn.Module, layer_map: Sequence[int]) -> nn.Module:
    """A student with `len(layer_map)` blocks; block k is a copy of the teacher's block `layer_map[k]`.

    Everything outside the blocks (embeddings, pooler, classification head) is copied as is, so the student
    starts as the teacher with some blocks skipped (and predicts far better than a random model). The teacher
    is left unchanged; the student is the teacher's class, with `config.num_hidden_layers` set to the new depth.
    """
    prefix, blocks = _layer_list(teacher)
    layer_map = list(layer_map)
    bad = [i for i in layer_map if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks)]
    if not layer_map or bad:
        raise MfkitError(
            f"layer_map={layer_map!r} must list teacher layers in 0..{len(blocks) - 1}"
            + (f"; {bad} are not." if bad else "; it is empty."),
            f"pass e.g. every_other_layer({len(blocks)}) = {every_other_layer(len(blocks))}.",
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layer_map)
    student = type(teacher)(config)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        match = pattern.match(key)
        origin = pattern.sub(f"{prefix}.{layer_map[int(match.group(1))]}.", key) if match else key
        state[key] = source[origin].detach().clone()
    student.load_state_dict(state)
    return student.to(next(teacher.parameters()).device)


def scratch_student(student: nn.Module, seed: int = 0) -> nn.Module:
    """A model of the student's exact shape with fresh random weights (the architecture's own initialisation)."""
    torch.manual_seed(seed)
    return type(student)(copy.deepcopy(student.config))


def parameter_count(model: nn.Module) -> int:
    """All parameters of `model` (shared ones once)."""
    return sum(p.numel() for p in model.parameters())
