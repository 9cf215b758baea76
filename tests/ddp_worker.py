"""Run by tests/test_distributed.py, alone or under `accelerate launch`: train tiny models several ways, write results.

Every fit runs on the CPU (`cpu=True`), so that a GPU machine runs the same gloo test as a CPU one.

1. plain: evaluation with the default `evaluate_loss`; rank 0 writes the losses to `out_path`.
2. early stopping: an `eval_fn` built on `metrics.token_nll`, `patience` and `restore_best`; every rank writes its
   final weights to `out_path.rank<i>.pt` and its evaluations to `out_path.rank<i>.json`.
3. gradual unfreezing, which must be refused under several processes: the error (or none) goes into that JSON.
4. gradient accumulation over an uneven training loader (its last batch is short, and accelerate pads it).
5. an `eval_fn` that reads its own loader, one `fit` never prepared, with an evaluation right at an epoch's end.
6. dropout on: the dropout masks each rank draws, and its final weights.
7. a checkpoint written, training interrupted, and resumed, with dropout on, against an uninterrupted run.
8. `transfer.MultiTaskTagger` over a BERT encoder with a pooler, 2 steps.
9. `paths.atomic_folder` written by every process at once.
Scenarios 4-9 write their figures into the same per-rank JSON, their weights into `out_path.rank<i>.<name>.pt`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.layers import GradualUnfreezing, layer_groups
from mfkit.loaders import make_loader, pad_collate
from mfkit.metrics import token_nll
from mfkit.paths import atomic_folder
from mfkit.training import Callback, TrainConfig, fit, make_accelerator
from mfkit.transfer import MultiTaskTagger


def tiny_gpt(dropout: float = 0.0) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=40,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    )


def nll_per_token(model, loader) -> dict[str, float]:
    """Mean next-token NLL and the number of tokens scored (gathered over every process inside fit)."""
    total, count = token_nll(model, loader)
    return {"eval_nll": total / count, "eval_tokens": count}


def config(**overrides) -> TrainConfig:
    """The settings every scenario shares (on the CPU, quiet) with its own on top."""
    return TrainConfig(
        **{"lr": 3e-3, "warmup": 2, "log_every": 4, "progress": False, "cpu": True, **overrides}
    )


class DropoutMasks(Callback):
    """A fingerprint of the embedding dropout's mask at each training step (the positions it zeroed)."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        self.masks: list[str] = []
        self.hook = model.transformer.drop.register_forward_hook(self.record)

    def record(self, module, args, output) -> None:
        if module.training:
            self.masks.append(hashlib.sha256((output == 0).numpy().tobytes()).hexdigest()[:16])

    def on_train_end(self, state) -> None:
        self.hook.remove()


class Interrupt(Callback):
    """Stops training (as a kill would) when step `at` begins."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_begin(self, state) -> None:
        if state.step == self.at:
            raise KeyboardInterrupt


def dropout_run(
    loader, checkpoint_dir: Path | None = None, interrupt_at: int | None = None
) -> GPT2LMHeadModel:
    """Tiny GPT with dropout 0.1, 8 steps; optionally checkpointed every 2 steps and interrupted."""
    seed_everything(0)
    model = tiny_gpt(dropout=0.1)
    settings = config(
        max_steps=8, checkpoint_dir=checkpoint_dir, checkpoint_every=2 if checkpoint_dir else None
    )
    fit(model, loader, settings, callbacks=[Interrupt(interrupt_at)])
    return model


def main(out_path: str, global_batch: int) -> None:
    accelerator = make_accelerator(config(max_steps=1))
    rank, processes = accelerator.process_index, accelerator.num_processes
    starts = torch.randint(0, 40, (128, 1), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in (starts + torch.arange(16)) % 40]
    per_process = global_batch // processes
    loader = make_loader(rows, per_process, pad_collate(0), seed=0)
    eval_loader = make_loader(rows[:32], per_process, pad_collate(0), shuffle=False)
    # 36 rows: with 2 processes and batches of 8 the last batches are uneven, and accelerate pads them with
    # repeated rows, which gathering must drop for the figures to equal one process's.
    uneven_loader = make_loader(rows[:36], per_process, pad_collate(0), shuffle=False)
    report: dict = {}

    def save_weights(model: torch.nn.Module, name: str) -> None:
        torch.save(model.state_dict(), f"{out_path}.rank{rank}.{name}.pt")

    seed_everything(0)
    history = fit(
        tiny_gpt(),
        loader,
        config(max_steps=12, eval_every=6),
        eval_loader=eval_loader,
        accelerator=accelerator,
    )
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(
                {
                    "processes": processes,
                    "train": [r["loss"] for r in history.train],
                    "eval": [e["eval_loss"] for e in history.eval],
                    "samples": history.samples,
                },
                f,
            )

    # A monitor that worsens as training improves (mode="max" on a loss), so that early stopping fires after
    # two evaluations without improvement and restore_best brings back the weights of the first one.
    seed_everything(0)
    model = tiny_gpt()
    early = config(max_steps=12, eval_every=2, patience=2, monitor="eval_nll", mode="max")
    history = fit(
        model, loader, early, eval_loader=uneven_loader, eval_fn=nll_per_token, accelerator=accelerator
    )
    torch.save(model.state_dict(), f"{out_path}.rank{rank}.pt")
    report.update(
        eval=history.eval,
        steps=history.steps,
        best_step=history.best_step,
        stopped_early=history.stopped_early,
    )

    seed_everything(0)
    model = tiny_gpt()
    groups = layer_groups(model)
    report["unfreezing_refused"] = None
    try:
        fit(
            model,
            loader,
            config(max_steps=2),
            accelerator=accelerator,
            callbacks=[GradualUnfreezing(groups, head_steps=1, every=1)],
        )
    except MfkitError as err:
        report["unfreezing_refused"] = str(err)

    # 4. 120 rows in micro-batches of 16 globally: 7 full ones and a last one of 8, which 2 processes split into
    # 4 + 4. With grad_accum=2 an optimizer step takes two micro-batches, an epoch 4 steps: 6 steps cross one end.
    seed_everything(0)
    model = tiny_gpt()
    short_loader = make_loader(rows[:120], per_process, pad_collate(0), seed=0)
    history = fit(model, short_loader, config(max_steps=6, grad_accum=2, log_every=1))
    report["accumulated"] = {"train": [r["loss"] for r in history.train], "samples": history.samples}
    save_weights(model, "accumulated")

    # 5. The evaluation loader is the eval_fn's own: every process reads all of it. Evaluations at steps 4 and 8,
    # the second right after the last batch of the first epoch (8 steps of 16 rows).
    own_loader = make_loader(rows[:32], 8, pad_collate(0), shuffle=False)
    seed_everything(0)
    history = fit(
        tiny_gpt(),
        loader,
        config(max_steps=8, eval_every=4, monitor="eval_nll"),
        eval_loader=eval_loader,
        eval_fn=lambda model, _loader: nll_per_token(model, own_loader),
    )
    report["own_loader_eval"] = history.eval

    # 6. Dropout on: the masks of every step, and the weights the run ends with.
    seed_everything(0)
    model = tiny_gpt(dropout=0.1)
    masks = DropoutMasks(model)
    fit(model, loader, config(max_steps=4), callbacks=[masks])
    report["dropout_masks"] = masks.masks
    save_weights(model, "dropout")

    # 7. Checkpoint, interrupt at step 5, resume from step 4's checkpoint; against an uninterrupted run.
    save_weights(dropout_run(loader), "uninterrupted")
    checkpoints = Path(f"{out_path}.checkpoints")
    with contextlib.suppress(KeyboardInterrupt):
        dropout_run(loader, checkpoints, interrupt_at=5)
    save_weights(dropout_run(loader, checkpoints), "resumed")

    # 8. Two training steps of a two-task tagger whose encoder came with a pooler (as AutoModel loads BERT).
    seed_everything(0)
    encoder = BertModel(
        BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    tagger = MultiTaskTagger(encoder, {"pos": 5, "spans": 3})
    tags = [
        {
            "input_ids": r["input_ids"],
            "labels": [t % 5 for t in r["input_ids"]],
            "labels_spans": [t % 3 for t in r["input_ids"]],
        }
        for r in rows
    ]
    report["tagger_error"] = None
    try:
        history = fit(tagger, make_loader(tags, per_process, pad_collate(0), seed=0), config(max_steps=2))
        report["tagger_steps"] = history.steps
    except Exception as err:  # DDP's unused-parameter error, reported instead of crashing the other scenarios
        report["tagger_error"] = f"{type(err).__name__}: {err}"[:500]

    # 9. Every process saves the same folder; each writes its own rank into it. The main process's copy must be
    # the one in place, and every process must find it there as soon as the save returns.
    target = Path(f"{out_path}.saved")
    with atomic_folder(target) as staging:
        (staging / "rank.txt").write_text(str(rank))
    report["saved_rank_read_back"] = (target / "rank.txt").read_text()

    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
