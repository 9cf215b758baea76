"""The prepared GPU check runs on the CPU at toy sizes and writes its table; the memory shapes cover every notebook
that trains or generates, read from the gpu profile."""

from __future__ import annotations

import argparse
import csv
import json
import os

import pytest
import torch

from mfkit import gpucheck
from mfkit.cli import _add_gpu_check
from mfkit.profiles import PROFILES


def test_gpu_check_runs_on_the_cpu_and_writes_one_table(tmp_path, capsys):
    code = gpucheck.main([str(tmp_path), "--small", "--steps", "2", "--cpu"])
    printed = capsys.readouterr().out
    rows = {r["check"]: r for r in csv.DictReader((tmp_path / "gpu_check.csv").open())}
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 0, printed
    assert [r["check"] for r in saved["rows"]] == list(rows)
    assert saved["machine"]["on"] == "cpu" and saved["machine"]["small"] is True
    expected = {
        f"{family} {precision} fit #{n}{' (same model)' if n == 2 else ''}"
        for family in ("minilm", "smollm2")
        for precision in ("fp16", "bf16")
        for n in (1, 2)
    } | {
        "smollm2 LoRA r8 fit + resume",
        "smollm2 QLoRA 4-bit fit + resume",
        "smollm2 generation (19's batch)",
    }
    assert set(rows) == expected
    for name, row in rows.items():
        assert row["status"] == "ok" or row["status"].startswith("skipped: "), (name, row)
        assert float(row["seconds"]) >= 0
        assert (row["peak_mb"] == "") == row["status"].startswith("skipped"), row
    # fp16 autocast is CUDA's; bf16 autocast runs on the CPU, in both fits of the same model (N2)
    assert rows["minilm fp16 fit #1"]["status"].startswith("skipped: accelerate autocasts fp16 on CUDA only")
    for family in ("minilm", "smollm2"):
        for n in ("#1", "#2 (same model)"):
            row = rows[f"{family} bf16 fit {n}"]
            assert row["status"] == "ok" and "autocast on 2/2 steps, head bfloat16" in row["detail"]
    assert "resumed at step 1" in rows["smollm2 LoRA r8 fit + resume"]["detail"]
    assert rows["smollm2 QLoRA 4-bit fit + resume"]["status"] == "skipped: 4-bit loading needs a CUDA GPU"
    assert "check" in printed and "wrote" in printed


def test_a_failing_check_is_a_row_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(gpucheck, "generation_check", broken)
    code = gpucheck.main([str(tmp_path), "--small", "--steps", "2", "--cpu", "--only", "gen"])
    (row,) = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert code == 1
    assert row["status"] == "failed: RuntimeError: CUDA error: out of memory"
    assert "broken" in row["detail"]


def test_the_cli_runs_the_same_check():
    parser = argparse.ArgumentParser()
    _add_gpu_check(
        parser.add_subparsers()
    )  # the whole `mfkit` parser imports nbformat (seconds); not needed here
    args = parser.parse_args(["gpu-check", "out", "--small", "--steps", "3"])
    assert args.handler is gpucheck.main and args.outdir == "out" and args.small and args.steps == 3


def test_the_gpu_shapes_come_from_the_gpu_profile():
    assert gpucheck.gpu_shape("minilm") == (
        PROFILES["03_full-finetuning"]["gpu"]["batch_size"],
        PROFILES["03_full-finetuning"]["gpu"]["max_length"],
    )
    assert gpucheck.gpu_shape("smollm2") == (16, 192)
    config = gpucheck.smollm2_config()
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)


@pytest.mark.parametrize("shape", gpucheck.memory_shapes(), ids=lambda s: f"{s.name}-{s.notebooks}")
def test_every_memory_shape_has_an_fp16_estimate(shape):
    with torch.device("meta"):
        model = gpucheck._memory_model(shape)
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = gpucheck.fp16_estimate_mb(shape, params, trained)
    assert 50 < estimate < 15_000  # every notebook fits a 16 GB T4


def test_the_memory_table_covers_every_notebook_that_trains_or_generates():
    covered = {nb.strip().split()[0] for s in gpucheck.memory_shapes() for nb in s.notebooks.split(",")}
    assert covered == {
        "02",
        "03",
        "04",
        "05",
        "06",
        "07",
        "08",
        "09",
        "10",
        "11",
        "12",
        "14",
        "16",
        "18",
        "19",
    }


GPU_DRY_RUN_AMOUNTS = [
    "MAX_STEPS=2",
    "EVAL_EVERY=1",
    "TRAIN_LIMIT=64",
    "EVAL_LIMIT=32",
    "VAL_LIMIT=32",
]


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.skipif(
    os.environ.get("MFKIT_GPU_DRY_RUN") != "1",
    reason="03 at the gpu profile's shapes on the CPU takes about 5 minutes on 2 busy cores; MFKIT_GPU_DRY_RUN=1 runs it",
)
def test_03_runs_its_gpu_profile_on_the_cpu_with_only_the_amounts_cut(tmp_path):
    """The gpu profile's batch (32) and length (256) with the steps, mails and evaluations cut to a minimum."""
    from mfkit.cli import main

    code = main(
        [
            "run",
            "--profile",
            "gpu",
            "--only",
            "03",
            "--output",
            str(tmp_path),
            "--param",
            *GPU_DRY_RUN_AMOUNTS,
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    result = summary["notebooks"]["03_full-finetuning"]
    assert code == 0, result["error"]
    knobs = result["run"]["knobs"]
    assert result["run"]["profile"] == "gpu"
    assert (knobs["batch_size"], knobs["max_length"]) == gpucheck.gpu_shape("minilm")
    assert set(result["run"]["overrides"]) == {
        "max_steps",
        "eval_every",
        "train_limit",
        "eval_limit",
        "val_limit",
    }
    assert result["metrics"]["steps"] == 2
