"""Run by tests/test_distributed.py, alone or under `accelerate launch`: train a tiny GPT, write the final losses."""

from __future__ import annotations

import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mfkit.env import seed_everything
from mfkit.loaders import make_loader, pad_collate
from mfkit.training import TrainConfig, fit, make_accelerator


def main(out_path: str, global_batch: int) -> None:
    config = TrainConfig(max_steps=12, lr=3e-3, warmup=2, log_every=4, eval_every=6, progress=False)
    accelerator = make_accelerator(config)
    seed_everything(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    starts = torch.randint(0, 40, (128, 1), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in (starts + torch.arange(16)) % 40]
    per_process = global_batch // accelerator.num_processes
    loader = make_loader(rows, per_process, pad_collate(0), seed=0)
    eval_loader = make_loader(rows[:32], per_process, pad_collate(0), shuffle=False)
    history = fit(model, loader, config, eval_loader=eval_loader, accelerator=accelerator)
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"processes": accelerator.num_processes, "train": [r["loss"] for r in history.train],
                       "eval": [e["eval_loss"] for e in history.eval], "samples": history.samples}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
