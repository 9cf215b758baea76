"""Profiles pick sizes: `smoke` (CI, ~1 min a notebook on 2 CPU cores), `cpu` (a laptop), `gpu` (Colab T4 and up).

Each notebook's sizes live here, in one table, so the notebooks, the chain runner and the tests agree on them.
A notebook passes its explicit knobs to `configure`; any knob that is not None overrides the profile.
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .env import seed_everything, versions
from .errors import MfkitError, check_choice, check_writable
from .paths import artifacts_dir as resolve_artifacts_dir
from .results import clear_results, record_run, set_notebook

PROFILE_NAMES = ("smoke", "cpu", "gpu")

# notebook -> profile -> knob -> value. Knob names are the notebook's parameters in lower case.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "00_setup-and-tour": {p: {} for p in PROFILE_NAMES},
    "01_data-and-tokenizers": {
        "smoke": {"vocab_size": 2000, "tokenizer_lines": 4000, "min_frequency": 2},
        "cpu": {"vocab_size": 4000, "tokenizer_lines": None, "min_frequency": 2},
        "gpu": {"vocab_size": 8000, "tokenizer_lines": None, "min_frequency": 2},
    },
    "02_pretraining-tiny-lm": {
        # cpu: ~1.6M training tokens (about 2 passes over Austen); more small steps beat fewer large ones here.
        "smoke": {
            "max_steps": 120,
            "batch_size": 16,
            "block_size": 64,
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 2,
            "lr": 5e-3,
            "eval_every": 40,
            "eval_batches": 8,
        },
        "cpu": {
            "max_steps": 800,
            "batch_size": 16,
            "block_size": 128,
            "n_layer": 4,
            "n_embd": 128,
            "n_head": 4,
            "lr": 2e-3,
            "eval_every": 200,
            "eval_batches": 25,
        },
        "gpu": {
            # 700 x 32 blocks of 256 = 5.7M tokens: about 8 passes over Austen's 2,847 training blocks (0.73M
            # tokens with the gpu profile's 8,000-token BPE); 3,000 steps made 34, where a 13.8M-parameter model
            # overfits (not yet measured on a GPU). Evaluated every 100 steps: restore_best keeps the best of 7.
            "max_steps": 700,
            "batch_size": 32,
            "block_size": 256,
            "n_layer": 6,
            "n_embd": 384,
            "n_head": 6,
            "lr": 1e-3,
            "eval_every": 100,
            "eval_batches": 50,
        },
    },
    "03_full-finetuning": {
        # smoke: batch 8 at twice the rate learns as much in 24 steps (test F1 0.86) for half the compute of batch 16;
        # 04, 05, 09 and 16 train on this budget too.
        "smoke": {
            "max_steps": 24,
            "batch_size": 8,
            "max_length": 64,
            "lr": 2e-4,
            "warmup": 0.1,
            "eval_every": 12,
            "train_limit": 800,
            "eval_limit": 160,
            "val_limit": None,
            "patience": 3,
        },
        # cpu: sized so that 04 and 05, which train several models on this same budget, fit 10 minutes on 2 cores.
        "cpu": {
            "max_steps": 160,
            "batch_size": 16,
            "max_length": 64,
            "lr": 2e-4,
            "warmup": 0.1,
            "eval_every": 40,
            "train_limit": None,
            "eval_limit": None,
            "val_limit": 300,
            "patience": 3,
        },
        # gpu: sized for a free Colab T4 (16 GB, fp16 autocast): about 4 epochs; notebooks 04 and 05 reuse this budget.
        "gpu": {
            "max_steps": 600,
            "batch_size": 32,
            "max_length": 256,
            "lr": 5e-5,
            "warmup": 0.1,
            "eval_every": 100,
            "train_limit": None,
            "eval_limit": None,
            "val_limit": None,
            "patience": 4,
        },
    },
    # 04 runs on notebook 03's budget (steps, batch, length, data, seed: read from 03's card); these are its own knobs.
    "04_multistep-finetuning": {
        "smoke": {
            "top_lr": 1e-3,
            "lr_divisor": 2.6,
            "cut_frac": 0.1,
            "stlr_ratio": 32,
            "head_steps": 4,
            "unfreeze_every": 2,
            "head_epochs": 2,
        },
        "cpu": {
            "top_lr": 1e-3,
            "lr_divisor": 2.6,
            "cut_frac": 0.1,
            "stlr_ratio": 32,
            "head_steps": 30,
            "unfreeze_every": 15,
            "head_epochs": 5,
        },
        "gpu": {
            "top_lr": 1e-3,
            "lr_divisor": 2.6,
            "cut_frac": 0.1,
            "stlr_ratio": 32,
            "head_steps": 100,
            "unfreeze_every": 50,
            "head_epochs": 10,
        },
    },
    # 05 trains its adapters on notebook 03's budget (read from 03's card); these are its own knobs.
    "05_peft-lora": {
        "smoke": {
            "seeds": [0],
            "lora_ranks": [4],
            "methods": ["adalora", "ia3", "prefix", "prompt"],
            "rank": 4,
            "virtual_tokens": 8,
            "lrs": {"lora": 1e-3, "adalora": 1e-3, "ia3": 3e-3, "prefix": 1e-2, "prompt": 3e-2},
        },
        # cpu: AdaLoRA at 1e-3 collapsed to one class on both seeds at this budget in development; add it back with
        # METHODS=["adalora", "ia3"] (the table flags collapsed runs). Six runs of 03's budget fit 10 minutes.
        "cpu": {
            "seeds": [0, 1],
            "lora_ranks": [4, 16],
            "methods": ["ia3"],
            "rank": 4,
            "virtual_tokens": 16,
            "lrs": {"lora": 1e-3, "adalora": 1e-3, "ia3": 3e-3, "prefix": 1e-2, "prompt": 3e-2},
        },
        "gpu": {
            "seeds": [0, 1],
            "lora_ranks": [2, 4, 16],
            "methods": ["adalora", "ia3", "prefix", "prompt"],
            "rank": 4,
            "virtual_tokens": 16,
            "lrs": {"lora": 1e-3, "adalora": 1e-3, "ia3": 3e-3, "prefix": 1e-2, "prompt": 3e-2},
        },
    },
    "06_instruction-tuning": {
        "smoke": {
            "max_steps": 2,
            "batch_size": 2,
            "lr": 2e-3,
            "rank": 8,
            "max_length": 128,
            "train_limit": 16,
            "eval_verses": 4,
            "max_new_tokens": 16,
        },
        "cpu": {
            "max_steps": 80,
            "batch_size": 4,
            "lr": 2e-3,
            "rank": 8,
            "max_length": 160,
            "train_limit": 400,
            "eval_verses": 48,
            "max_new_tokens": 64,
        },
        "gpu": {
            "max_steps": 300,
            "batch_size": 16,
            "lr": 1e-3,
            "rank": 8,
            "max_length": 192,
            "train_limit": 5000,
            "eval_verses": 200,
            "max_new_tokens": 96,
        },
    },
    # 07 continues 06's LoRA adapter: continued SFT on the chosen answers (the baseline) and each preference loss in
    # METHODS, every run MAX_STEPS steps of BATCH_SIZE pairs. Training pairs come from TRAIN_VERSES validation verses
    # (three rejected kinds each); held-out pairs and generation scores from EVAL_VERSES test verses picked as 06
    # picks them. cpu keeps SimPO and ORPO out to stay within 10 minutes on 2 cores (smoke and gpu run all four).
    "07_preference-alignment": {
        "smoke": {
            "methods": ("dpo", "ipo", "simpo", "orpo"),
            "max_steps": 2,
            "batch_size": 1,
            "lr": 5e-4,
            "train_verses": 2,
            "eval_verses": 2,
            "samples": 2,
            "max_length": 160,
            "max_new_tokens": 8,
            "trl_steps": 1,
            "beta": 0.1,
            "ipo_tau": 0.5,
            "simpo_beta": 2.0,
            "simpo_gamma": 1.0,
            "orpo_lambda": 0.1,
            "resamples": 200,
        },
        "cpu": {
            "methods": ("dpo", "ipo"),
            "max_steps": 30,
            "batch_size": 4,
            "lr": 5e-4,
            "train_verses": 40,
            "eval_verses": 32,
            "samples": 2,
            "max_length": 160,
            "max_new_tokens": 48,
            "trl_steps": 3,
            "beta": 0.1,
            "ipo_tau": 0.5,
            "simpo_beta": 2.0,
            "simpo_gamma": 1.0,
            "orpo_lambda": 0.1,
            "resamples": 1000,
        },
        "gpu": {
            "methods": ("dpo", "ipo", "simpo", "orpo"),
            "max_steps": 200,
            "batch_size": 16,
            "lr": 2e-4,
            "train_verses": 1200,
            "eval_verses": 200,
            "samples": 4,
            "max_length": 192,
            "max_new_tokens": 96,
            "trl_steps": 10,
            "beta": 0.1,
            "ipo_tau": 0.5,
            "simpo_beta": 2.0,
            "simpo_gamma": 1.0,
            "orpo_lambda": 0.1,
            "resamples": 1000,
        },
    },
    "08_prompting-few-shot": {
        "smoke": {
            "shots": (0, 2),
            "draws": 1,
            "templates": ("spam-ham", "yes-no"),
            "eval_limit": 16,
            "max_chars": 200,
            "max_context_tokens": 2048,
        },
        "cpu": {
            "shots": (0, 2, 8),
            "draws": 2,
            "templates": ("spam-ham", "yes-no", "folder-a-b"),
            "eval_limit": 100,
            "max_chars": 200,
            "max_context_tokens": 2048,
        },
        "gpu": {
            "shots": (0, 1, 2, 4, 8),
            "draws": 3,
            "templates": ("spam-ham", "yes-no", "folder-a-b"),
            "eval_limit": 300,
            "max_chars": 400,
            "max_context_tokens": 4096,
        },
    },
    # 12: continued pretraining of 02's tiny GPT on KJV (what it buys against the same model from scratch, what it
    # forgets of Austen) and the remedies (replay, EWC, LoRA), every run `kjv_steps` steps at the same KJV budget.
    # cpu: 9 runs at 02's cpu model size (~0.2 s a step on 2 idle cores). gpu (a T4, not yet measured): 600 x 32
    # blocks of 256 = 4.9M KJV tokens, about 5 passes over KJV's 3,766 training blocks (with Austen's tokenizer).
    # EWC lambdas: at 30 steps on 02's cpu model, 1e3 cut Austen's perplexity increase by ~15%, 1e4 ~40%, 1e5 ~70%,
    # 1e6 ~95% (with KJV perplexity ~1.7x plain's); replay 0.25 ~70% at KJV perplexity ~1.04x plain's.
    "12_continual-learning": {
        "smoke": {
            "kjv_steps": 8,
            "batch_size": 8,
            "lr": 1e-3,
            "eval_every": 4,
            "eval_blocks": 8,
            "kjv_verses": 800,
            "austen_paragraphs": 800,
            "fisher_blocks": 4,
            "replay_shares": [0.25],
            "ewc_lambdas": [1e4],
            "lora_r": 8,
            "lora_lr": 5e-3,
        },
        "cpu": {
            "kjv_steps": 120,
            "batch_size": 16,
            "lr": 1e-3,
            "eval_every": 40,
            "eval_blocks": 48,
            "kjv_verses": None,
            "austen_paragraphs": None,
            "fisher_blocks": 64,
            "replay_shares": [0.1, 0.25, 0.5],
            "ewc_lambdas": [1e4, 1e5, 1e6],
            "lora_r": 8,
            "lora_lr": 5e-3,
        },
        "gpu": {
            "kjv_steps": 600,
            "batch_size": 32,
            "lr": 5e-4,
            "eval_every": 100,
            "eval_blocks": 256,
            "kjv_verses": None,
            "austen_paragraphs": None,
            "fisher_blocks": 256,
            "replay_shares": [0.1, 0.25, 0.5],
            "ewc_lambdas": [1e3, 1e4, 1e5, 1e6],
            "lora_r": 16,
            "lora_lr": 2e-3,
        },
    },
    # 13: a prequential spam stream (easy groups first) for a hashed linear model, and update vs retraining.
    # cpu: the whole stream of training + validation mails, about 40 s; nothing here needs a GPU.
    "13_online-learning": {
        "smoke": {
            "stream_limit": 400,
            "stream_batch": 16,
            "first_period": 150,
            "retrain_every": 150,
            "retrain_epochs": 2,
            "sgd_lr": 0.2,
            "lr_boost": 5.0,
            "boost_batches": 10,
            "f1_window": 100,
            "chunks": 2,
            "update_epochs": 2,
        },
        "cpu": {
            "stream_limit": None,
            "stream_batch": 16,
            "first_period": 1000,
            "retrain_every": 1000,
            "retrain_epochs": 3,
            "sgd_lr": 0.2,
            "lr_boost": 5.0,
            "boost_batches": 10,
            "f1_window": 250,
            "chunks": 4,
            "update_epochs": 3,
        },
        "gpu": {
            "stream_limit": None,
            "stream_batch": 16,
            "first_period": 1000,
            "retrain_every": 1000,
            "retrain_epochs": 3,
            "sgd_lr": 0.2,
            "lr_boost": 5.0,
            "boost_batches": 10,
            "f1_window": 250,
            "chunks": 4,
            "update_epochs": 3,
        },
    },
    # 11: every tagger takes MAX_STEPS steps (adaptations ADAPT_STEPS); cpu is sized so the eight tagger runs and six
    # short adaptations fit 8 minutes on 2 cores (about 0.4 s per tagger step of 16).
    "11_transfer-token-classification": {
        "smoke": {
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 32,
            "lr": 2e-4,
            "scratch_lr": 5e-4,
            "warmup": 0.1,
            "train_limit": 32,
            "small_budget": 8,
            "eval_limit": 16,
            "genre_eval_limit": 4,
            "source_genres": ["news"],
            "target_genres": ["religion"],
            "adapt_sizes": [0, 4],
            "adapt_all_limit": 8,
            "adapt_steps": 1,
        },
        "cpu": {
            "max_steps": 60,
            "batch_size": 16,
            "max_length": 48,
            "lr": 2e-4,
            "scratch_lr": 5e-4,
            "warmup": 0.1,
            "train_limit": 960,
            "small_budget": 120,
            "eval_limit": 400,
            "genre_eval_limit": 60,
            "source_genres": ["news", "editorial", "reviews"],
            "target_genres": ["fiction", "religion"],
            "adapt_sizes": [0, 50, 200],
            "adapt_all_limit": 400,
            "adapt_steps": 20,
        },
        "gpu": {
            "max_steps": 600,
            "batch_size": 32,
            "max_length": 96,
            "lr": 5e-5,
            "scratch_lr": 3e-4,
            "warmup": 0.1,
            "train_limit": None,
            "small_budget": 500,
            "eval_limit": None,
            "genre_eval_limit": None,
            "source_genres": ["news", "editorial", "reviews"],
            "target_genres": ["fiction", "humor", "religion", "learned"],
            "adapt_sizes": [0, 50, 200],
            "adapt_all_limit": None,
            "adapt_steps": 150,
        },
    },
    # 16 distils notebook 03's classifier on 03's budget (length, batch, lr, seed: read from 03's card); max_steps
    # None keeps 03's steps. Every student sees max_steps x batch_size training mails once (teacher logits cached
    # for exactly those). cpu: a 2x2 grid of (T, alpha) + hard labels + scratch = 6 student runs of 3 layers.
    "16_distillation": {
        "smoke": {
            "max_steps": 8,
            "temperatures": [2.0],
            "alphas": [0.5],
            "threads": 1,
            "speed_rounds": 1,
            "speed_repeats": 2,
            "speed_batch": 32,
        },
        "cpu": {
            "max_steps": None,
            "temperatures": [2.0, 4.0],
            "alphas": [0.5, 0.9],
            "threads": 1,
            "speed_rounds": 3,
            "speed_repeats": 10,
            "speed_batch": 32,
        },
        "gpu": {
            "max_steps": None,
            "temperatures": [1.0, 2.0, 4.0, 8.0],
            "alphas": [0.1, 0.5, 0.9],
            "threads": 2,
            "speed_rounds": 3,
            "speed_repeats": 20,
            "speed_batch": 32,
        },
    },
    # 09 trains on notebook 03's settings (model, length, batch, learning rate, warmup, seed: read from 03's card);
    # these are its own knobs. cpu: 4 methods x 3 label shares x 2 seeds; a run makes EPOCHS passes over its
    # labelled mails but at least MIN_STEPS steps (16, 16, 30 steps at 1%, 5%, 20%); FGM steps cost about twice
    # as much, pseudo-labelling trains once per round; tests on a fixed stratified TEST_LIMIT mails.
    # EPSILON 1.0 made runs of 16 steps collapse to predicting ham only (F1 0); 0.25 did not.
    "09_data-augmentation": {
        "smoke": {
            "shares": [0.01, 0.05],
            "seeds": [0],
            "min_steps": 2,
            "epochs": 0.05,
            "eda_copies": 1,
            "eda_alpha": 0.1,
            "threshold": 0.9,
            "rounds": 1,
            "balanced_pseudo": True,
            "pool_limit": 24,
            "epsilon": 0.25,
            "noise_rate": 0.15,
            "test_limit": 32,
            "survival_limit": 40,
        },
        "cpu": {
            "shares": [0.01, 0.05, 0.2],
            "seeds": [0, 1],
            "min_steps": 16,
            "epochs": 0.5,
            "eda_copies": 4,
            "eda_alpha": 0.1,
            "threshold": 0.9,
            "rounds": 2,
            "balanced_pseudo": True,
            "pool_limit": 200,
            "epsilon": 0.25,
            "noise_rate": 0.15,
            "test_limit": 200,
            "survival_limit": 300,
        },
        "gpu": {
            "shares": [0.01, 0.05, 0.2],
            "seeds": [0, 1, 2],
            "min_steps": 60,
            "epochs": 2.0,
            "eda_copies": 4,
            "eda_alpha": 0.1,
            "threshold": 0.9,
            "rounds": 3,
            "balanced_pseudo": True,
            "pool_limit": 2000,
            "epsilon": 0.25,
            "noise_rate": 0.15,
            "test_limit": None,
            "survival_limit": None,
        },
    },
    # 18 prunes notebook 03's classifier on 03's data, length and seed (read from its card); these are its own knobs.
    # cpu: 8 unstructured retrains of RETRAIN_STEPS plus 2 structured retrains of STRUCTURED_STEPS (~0.6 s a step).
    "18_pruning": {
        "smoke": {
            "sparsities": (0.9,),
            "retrain_steps": 2,
            "rounds": 2,
            "retrain_lr": 1e-4,
            "importance_batches": 2,
            "ffn_keep": 384,
            "heads_keep": 8,
            "structured_steps": 2,
            "speed_batch": 8,
            "speed_repeats": 2,
            "threads": 1,
        },
        "cpu": {
            "sparsities": (0.3, 0.5, 0.7, 0.9),
            "retrain_steps": 30,
            "rounds": 3,
            "retrain_lr": 1e-4,
            "importance_batches": 20,
            "ffn_keep": 384,
            "heads_keep": 8,
            "structured_steps": 60,
            "speed_batch": 32,
            "speed_repeats": 10,
            "threads": 1,
        },
        "gpu": {
            "sparsities": (0.3, 0.5, 0.7, 0.8, 0.9),
            "retrain_steps": 150,
            "rounds": 5,
            "retrain_lr": 5e-5,
            "importance_batches": 50,
            "ffn_keep": 384,
            "heads_keep": 8,
            "structured_steps": 300,
            "speed_batch": 32,
            "speed_repeats": 20,
            "threads": 2,
        },
    },
    # 17 quantizes notebook 03's classifier (and 16's student when it exists); timings pin THREADS threads.
    "17_quantization": {
        "smoke": {
            "threads": 1,
            "repeats": 3,
            "speed_batch": 8,
            "thread_counts": [1, 2],
            "lengths": [32],
            "int4_group": 32,
            "lm_variants": ["dynamic int8"],
            "lm_blocks": 1,
            "lm_block_size": 32,
            "new_tokens": 2,
            "test_limit": 48,
        },
        # cpu: the full test split at 03's length; SmolLM2 scored on 8 blocks of 256 Austen tokens (~2k tokens).
        "cpu": {
            "threads": 1,
            "repeats": 10,
            "speed_batch": 32,
            "thread_counts": [1, 2],
            "lengths": [16, 64, 256],
            "int4_group": 32,
            "lm_variants": ["dynamic int8", "dynamic int8, per-channel", "weight-only int8"],
            "lm_blocks": 8,
            "lm_block_size": 256,
            "new_tokens": 32,
            "test_limit": None,
        },
        "gpu": {
            "threads": 2,
            "repeats": 20,
            "speed_batch": 32,
            "thread_counts": [1, 2],
            "lengths": [16, 64, 256, 512],
            "int4_group": 32,
            "lm_variants": ["dynamic int8", "dynamic int8, per-channel", "weight-only int8"],
            "lm_blocks": 32,
            "lm_block_size": 512,
            "new_tokens": 64,
            "test_limit": None,
        },
    },
    # 14 searches fine-tuning hyperparameters on notebook 03's data, length and seed (read from 03's card). Every
    # searcher gets grid_size(grid) trials; a trial sees about trial_examples training mails (steps = trial_examples /
    # batch size) and is scored on val_limit validation mails at each of its rungs. cpu: 3 x 8 trials of 320 mails.
    # method "full" in every profile: on 2 CPU cores a LoRA step cost no less than a full one, and learned less.
    "14_hyperparameter-search": {
        "smoke": {
            "method": "full",
            "grid": {"lr": 2},
            "trial_examples": 16,
            "rungs": 2,
            "startup_trials": 1,
            "train_limit": 200,
            "val_limit": 32,
            "eval_limit": 64,
            "seeds": [0],
        },
        "cpu": {
            "method": "full",
            "grid": {"lr": 4, "batch_size": 2},
            "trial_examples": 320,
            "rungs": 3,
            "startup_trials": 3,
            "train_limit": None,
            "val_limit": 150,
            "eval_limit": None,
            "seeds": [0, 1, 2],
        },
        "gpu": {
            "method": "full",
            "grid": {"lr": 4, "batch_size": 3},
            "trial_examples": 4800,
            "rungs": 4,
            "startup_trials": 4,
            "train_limit": None,
            "val_limit": None,
            "eval_limit": None,
            "seeds": [0, 1, 2, 3, 4],
        },
    },
    # 15 scores notebook 03's classifier (its data and length, read from 03's card).
    "15_evaluation": {
        "smoke": {"n_bins": 10, "n_resamples": 50},
        "cpu": {"n_bins": 10, "n_resamples": 2000},
        "gpu": {"n_bins": 15, "n_resamples": 5000},
    },
    # 10 trains MiniLM afresh, (variants) x (seeds) runs of MAX_STEPS, on a training set small enough to be
    # memorised within the budget (none's validation loss rises while its training loss falls). Strengths act:
    # weight decay with lambda * sum(lr_t) ~ 0.1, L1's soft threshold reaching alpha * sum(lr_t) ~ the size of
    # MiniLM's smaller weights, dropout and label smoothing at the published 0.1.
    "10_regularization": {
        "smoke": {
            "seeds": [0],
            "train_limit": 16,
            "eval_limit": 16,
            "max_length": 32,  # the shortest cut the spam splits are deduplicated at (data/build_data.py)
            "batch_size": 8,
            "max_steps": 4,
            "eval_every": 2,
            "lr": 1e-4,
            "dropout": 0.1,
            "weight_decay": 25.0,
            "l1": 1.0,
            "label_smoothing": 0.1,
            "patience": 1,
        },
        "cpu": {
            "seeds": [0, 1],
            "train_limit": 64,
            "eval_limit": 160,
            "max_length": 32,
            "batch_size": 16,
            "max_steps": 80,
            "eval_every": 8,
            "lr": 1e-4,
            "dropout": 0.1,
            "weight_decay": 25.0,
            "l1": 1.0,
            "label_smoothing": 0.1,
            "patience": 3,
        },
        "gpu": {
            "seeds": [0, 1, 2],
            "train_limit": 256,
            "eval_limit": None,
            "max_length": 128,
            "batch_size": 16,
            "max_steps": 400,
            "eval_every": 20,
            "lr": 1e-4,
            "dropout": 0.1,
            "weight_decay": 5.0,
            "l1": 0.5,
            "label_smoothing": 0.1,
            "patience": 4,
        },
    },
    # 19 decodes with 02's tiny GPT (and SmolLM2 from the cpu profile on): every strategy on held-out Austen prompts.
    "19_decoding-inference": {
        "smoke": {
            "models": ("tiny-gpt",),
            "prompts": 4,
            "prompt_tokens": 12,
            "max_new_tokens": 24,
            "cache_lengths": (8, 24, 48),
            "batch_sizes": (1, 4),
        },
        "cpu": {
            "models": ("tiny-gpt", "smollm2-135m"),
            "prompts": 12,
            "prompt_tokens": 16,
            "max_new_tokens": 48,
            "cache_lengths": (16, 32, 64, 96),
            "batch_sizes": (1, 4, 8),
        },
        "gpu": {
            "models": ("tiny-gpt", "smollm2-135m"),
            "prompts": 40,
            "prompt_tokens": 24,
            "max_new_tokens": 96,
            "cache_lengths": (32, 64, 128, 224),
            "batch_sizes": (1, 8, 32),
        },
    },
    # 20 reads the chain's ledger and saved models; its own knobs size the timing and the load test.
    "20_pipeline-serving": {
        "smoke": {"tolerance": 0.01, "clients": (1, 8), "requests_per_client": 4, "speed_texts": 8},
        "cpu": {"tolerance": 0.01, "clients": (1, 8, 32), "requests_per_client": 8, "speed_texts": 32},
        "gpu": {"tolerance": 0.01, "clients": (1, 8, 32), "requests_per_client": 16, "speed_texts": 64},
    },
}


class Config(Mapping):
    """A read-only mapping of a notebook's resolved knobs, also readable as attributes (`cfg.max_steps`)."""

    def __init__(self, knobs: dict[str, Any]) -> None:
        self._knobs = dict(knobs)

    def __getitem__(self, name: str) -> Any:
        return self._knobs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._knobs)

    def __len__(self) -> int:
        return len(self._knobs)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_knobs"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"Config({self._knobs!r})"


# Knobs every notebook accepts (None: not set), so a notebook that takes DATASET can take its columns too.
DATA_KNOBS: dict[str, Any] = {"text_column": None, "label_column": None, "positive_label": None}
# Knobs for which 0 is a meaningful value (other whole numbers count from 1, other rates must be above 0).
ZERO_ALLOWED = frozenset(
    {
        "head_steps",
        "warmup",
        "patience",
        "min_frequency",
        # 0 switches a regularizer or a perturbation off: a baseline worth running.
        "dropout",
        "weight_decay",
        "l1",
        "label_smoothing",
        "epsilon",
        "noise_rate",
    }
)
# Knobs that are fractions strictly between 0 and 1.
FRACTION_KNOBS = frozenset({"cut_frac"})
ALL_WORDS = ("all", "none")
SEED_LIMIT = 2**32


def profile_knobs(notebook: str, profile: str) -> dict[str, Any]:
    """The sizes `profile` gives `notebook` (a copy), with the data knobs every notebook accepts."""
    check_choice("PROFILE", profile, PROFILE_NAMES)
    if notebook not in PROFILES:
        raise MfkitError(f"No profile table for notebook {notebook!r}.", f"add it to PROFILES in {__file__}.")
    return {**DATA_KNOBS, **copy.deepcopy(PROFILES[notebook][profile])}


def _examples(notebook: str, name: str) -> list[Any]:
    """The values the profiles of `notebook` give knob `name` (None included)."""
    return [PROFILES[notebook][p].get(name) for p in PROFILE_NAMES if name in PROFILES[notebook][p]]


def is_limit(notebook: str, name: str) -> bool:
    """True for a row limit, where None means "all": a `*_limit` knob, or one some profile leaves at None."""
    return name.endswith("_limit") or None in _examples(notebook, name)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_value(label: str, value: Any, example: Any, zero_ok: bool) -> tuple[Any, str | None]:
    """`value` checked against the kind of `example` (a profile's value): (value to use, problem or None)."""
    if isinstance(example, bool):
        return value, None if isinstance(value, bool) else f"{label}={value!r} must be True or False"
    if isinstance(example, int):
        whole = _is_number(value) and float(value).is_integer() and math.isfinite(float(value))
        lowest = 0 if zero_ok else 1
        if not whole or value < lowest:
            return value, f"{label}={value!r} must be a whole number of {lowest} or more"
        return int(value), None
    if isinstance(example, float):
        if not _is_number(value) or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            bound = "zero or more" if zero_ok else "greater than zero"
            return value, f"{label}={value!r} must be a finite number {bound}"
        return value, None
    if isinstance(example, str):
        return value, None if isinstance(
            value, str
        ) and value else f"{label}={value!r} must be a non-empty string"
    if isinstance(example, list | tuple):
        if not isinstance(value, list | tuple) or not value:
            return value, f"{label}={value!r} must be a non-empty list like {list(example)}"
        zero_ok = zero_ok or 0 in example
        checked = [_check_value(f"{label}[{i}]", v, example[0], zero_ok) for i, v in enumerate(value)]
        problems = [p for _, p in checked if p]
        return type(example)(v for v, _ in checked), "; ".join(problems) or None
    if isinstance(example, Mapping):
        if not isinstance(value, Mapping):
            return value, f"{label}={value!r} must be a dict like {dict(example)}"
        unknown = sorted(set(value) - set(example), key=str)
        if unknown:
            return value, f"{label} has unknown key(s) {unknown}; its keys are {sorted(example)}"
        checked = {k: _check_value(f"{label}[{k!r}]", v, example[k], zero_ok) for k, v in value.items()}
        problems = [p for _, p in checked.values() if p]
        return {**example, **{k: v for k, (v, _) in checked.items()}}, "; ".join(problems) or None
    return value, None


def _check_knob(notebook: str, name: str, value: Any, profile_value: Any) -> tuple[Any, str | None]:
    """One explicit knob checked against the notebook's profiles: (resolved value, problem or None).

    A limit accepts "all" (or 0) for no limit; a dict knob is merged into the profile's dict.
    """
    if name in DATA_KNOBS:
        ok = isinstance(value, str) and value or (name == "positive_label" and _is_number(value))
        return value, None if ok else f"{name}={value!r} must be a column or label name (a string)"
    if is_limit(notebook, name):
        if (isinstance(value, str) and value.strip().lower() in ALL_WORDS) or (
            value == 0 and _is_number(value)
        ):
            return None, None
        return _check_value(name, value, 1, zero_ok=False)
    example = next((e for e in _examples(notebook, name) if e is not None), None)
    if isinstance(example, Mapping) and isinstance(profile_value, Mapping):
        example = profile_value  # merge into this profile's dict, not another's
    value, problem = _check_value(name, value, example, zero_ok=name in ZERO_ALLOWED)
    if problem is None and name in FRACTION_KNOBS and not 0 < value < 1:
        problem = f"{name}={value!r} must be a fraction between 0 and 1"
    return value, problem


def _check_seed(seed: Any) -> str | None:
    ok = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT
    return None if ok else f"seed={seed!r} must be a whole number from 0 to {SEED_LIMIT - 1}"


def resolve_knobs(notebook: str, profile: str, seed: Any = 0, **knobs: Any) -> dict[str, Any]:
    """A notebook's knobs: its profile's values, replaced by every explicit knob that is not None, all checked.

    Raises one `MfkitError` listing every unknown knob or bad value, before anything is loaded.
    """
    resolved = profile_knobs(notebook, profile)
    unknown = sorted(set(knobs) - set(resolved))
    if unknown:
        hints = {k: difflib.get_close_matches(k, resolved, n=1) for k in unknown}
        near = "; ".join(f"{k} -> {v[0]}?" for k, v in hints.items() if v)
        raise MfkitError(
            f"Unknown knob(s) {unknown} for {notebook}" + (f" (did you mean: {near})." if near else "."),
            f"use the notebook's parameters: {sorted(resolved)}.",
        )
    problems = [p for p in [_check_seed(seed)] if p]
    for name, value in knobs.items():
        if value is not None:
            resolved[name], problem = _check_knob(notebook, name, value, resolved[name])
            problems += [problem] if problem else []
    if problems:
        raise MfkitError(
            f"Bad value(s) for {notebook}: " + "; ".join(problems) + ".",
            "fix these parameters in the notebook's parameters cell (or --param NAME=VALUE); leave a knob at "
            "None for the profile's value.",
        )
    return resolved


def _plain_knob(value: Any) -> Any:
    """A knob value as JSON can hold it (paths as text, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain_knob(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain_knob(v) for k, v in value.items()}
    return value


def run_info(notebook: str, resolved: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """What produced a notebook's numbers: its resolved knobs, which were explicit, when, and the versions."""
    from . import __version__

    found = versions(("torch", "transformers"))
    return {
        "notebook": notebook,
        "profile": resolved["profile"],
        "seed": resolved["seed"],
        "knobs": {k: _plain_knob(v) for k, v in resolved.items() if k not in ("notebook", "profile", "seed")},
        "overrides": sorted(overrides),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {**found, "mfkit": __version__},
    }


def writable_artifacts(path: str | Path | None) -> Path:
    """The artifacts folder (see `mfkit.paths.artifacts_dir`), proven writable now rather than after the training."""
    fix = "point ARTIFACTS_DIR at a folder you can write to"
    try:
        folder = resolve_artifacts_dir(path)
    except OSError as exc:
        raise MfkitError(
            f"ARTIFACTS_DIR {exc.filename or path} cannot be written to ({exc.strerror or type(exc).__name__}).",
            f"{fix}, or make the folder writable (e.g. chmod -R u+w).",
        ) from exc
    return check_writable(folder / "results", "ARTIFACTS_DIR", fix).parent


def configure(
    notebook: str,
    profile: str = "smoke",
    artifacts_dir: str | Path | None = None,
    seed: int = 0,
    quiet: bool = False,
    **knobs: Any,
) -> Config:
    """Resolve a notebook's knobs from its profile and explicit overrides, seed, and start its results ledger.

    - A knob passed as None takes the profile's value; an unknown knob is an error (it is usually a typo).
    - Every explicit value is checked against the kind of the profile's value before anything is loaded:
      whole numbers >= 1 (>= 0 for `ZERO_ALLOWED`), finite positive rates, non-empty lists, one `MfkitError`
      listing every problem.
    - A row limit (`*_limit`, or a knob some profile leaves at None) set to "all" or 0 means no limit (None),
      even when the profile has one.
    - A dict knob (e.g. `lrs`) may be given in part: its keys replace the profile's, unknown keys are an error.
    - `text_column`, `label_column`, `positive_label` are accepted by every notebook (None: not set), for
      `mfkit.data.load_data`.
    - The artifacts folder must be writable (checked now, not after the training). The results ledger of the
      notebook is cleared and starts with the run's resolved knobs and versions (`mfkit.results.RUN_KEY`).
    """
    resolved = resolve_knobs(notebook, profile, seed, **knobs)
    folder = writable_artifacts(artifacts_dir)
    resolved.update(profile=profile, seed=seed, artifacts_dir=folder, notebook=notebook)
    set_notebook(notebook, folder)
    clear_results(notebook, folder)
    record_run(run_info(notebook, resolved, [k for k, v in knobs.items() if v is not None]), notebook)
    seed_everything(seed)
    cfg = Config(resolved)
    if not quiet:
        width = max(map(len, cfg))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in cfg.items()))
    return cfg
