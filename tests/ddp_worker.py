"""Run by tests/test_distributed.py, alone or under `accelerate launch`: train a tiny GPT three ways, write results.

1. plain: evaluation with the default `evaluate_loss`; rank 0 writes the losses to `out_path`.
2. early stopping: an `eval_fn` built on `metrics.token_nll`, `patience` and `restore_best`; every rank writes its
   final weights to `out_path.rank<i>.pt` and its evaluations to `out_path.rank<i>.json`.
3. gradual unfreezing, which must be refused under several processes: the error (or none) goes into that JSON.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.layers import GradualUnfreezing, layer_groups
from mfkit.loaders import make_loader, pad_collate
from mfkit.metrics import token_nll
from mfkit.training import TrainConfig, fit, make_accelerator


def tiny_gpt() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=40,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def nll_per_token(model, loader) -> dict[str, float]:
    """Mean next-token NLL and the number of tokens scored (gathered over every process inside fit)."""
    total, count = token_nll(model, loader)
    return {"eval_nll": total / count, "eval_tokens": count}


def main(out_path: str, global_batch: int) -> None:
    config = TrainConfig(max_steps=12, lr=3e-3, warmup=2, log_every=4, eval_every=6, progress=False)
    accelerator = make_accelerator(config)
    rank = accelerator.process_index
    starts = torch.randint(0, 40, (128, 1), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in (starts + torch.arange(16)) % 40]
    per_process = global_batch // accelerator.num_processes
    loader = make_loader(rows, per_process, pad_collate(0), seed=0)
    eval_loader = make_loader(rows[:32], per_process, pad_collate(0), shuffle=False)
    # 36 rows: with 2 processes and batches of 8 the last batches are uneven, and accelerate pads them with
    # repeated rows, which gathering must drop for the figures to equal one process's.
    uneven_loader = make_loader(rows[:36], per_process, pad_collate(0), shuffle=False)

    seed_everything(0)
    history = fit(tiny_gpt(), loader, config, eval_loader=eval_loader, accelerator=accelerator)
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(
                {
                    "processes": accelerator.num_processes,
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
    early = TrainConfig(
        max_steps=12,
        lr=3e-3,
        warmup=2,
        log_every=4,
        eval_every=2,
        patience=2,
        monitor="eval_nll",
        mode="max",
        progress=False,
    )
    history = fit(
        model, loader, early, eval_loader=uneven_loader, eval_fn=nll_per_token, accelerator=accelerator
    )
    torch.save(model.state_dict(), f"{out_path}.rank{rank}.pt")

    seed_everything(0)
    model = tiny_gpt()
    groups = layer_groups(model)
    refused = None
    try:
        fit(
            model,
            loader,
            TrainConfig(max_steps=2, progress=False),
            accelerator=accelerator,
            callbacks=[GradualUnfreezing(groups, head_steps=1, every=1)],
        )
    except MfkitError as err:
        refused = str(err)
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(
            {
                "eval": history.eval,
                "steps": history.steps,
                "best_step": history.best_step,
                "stopped_early": history.stopped_early,
                "unfreezing_refused": refused,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
