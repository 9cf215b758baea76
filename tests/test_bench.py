"""`mfkit bench`: the FLOPs count behind MFU, the timing window, paired ratios and their verdict, the bare loop's
precision, and one tiny end-to-end run of every runner."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import mfkit.quantize
from mfkit import bench
from mfkit.cli import main
from mfkit.loaders import make_loader, pad_collate
from mfkit.training import TrainConfig


def tiny_gpt() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def gpt_rows(n: int) -> list[dict]:
    return [
        {
            "input_ids": [(i + j) % 50 for j in range(3 + i % 9)],
            "labels": [(i + j) % 50 for j in range(3 + i % 9)],
        }
        for i in range(n)
    ]


def test_matmul_parameters_count_linear_weights_not_embeddings():
    vocab, d, layers = 50, 16, 2
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=8, n_embd=d, n_layer=layers, n_head=2))
    # per block: qkv (d x 3d), attention out (d x d), MLP up (d x 4d) and down (4d x d) = 12 d^2; plus the tied LM head
    assert bench.matmul_parameters(gpt) == layers * 12 * d * d + vocab * d
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=4 * d,
            num_labels=2,
        )
    )
    # no LM head: the word embeddings are a lookup; the pooler (d x d) and the classifier (d x 2) multiply
    assert bench.matmul_parameters(bert) == layers * 12 * d * d + d * d + 2 * d


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA L40S", 362.0),  # not the L4 that "L40S" starts with
        ("NVIDIA L4", 121.0),
        ("NVIDIA H100 PCIe", 756.0),  # not the SXM part
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("Tesla T4", 65.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_mfu_rates_each_gpu_by_its_own_peak(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    result = bench.mfu({"device": "cuda", "model_tflops_per_s": 36.2})
    assert result == (pytest.approx(36.2 / peak) if peak else None)
    assert bench.mfu({"device": "cpu", "model_tflops_per_s": 36.2}) is None


def test_window_times_whole_epochs_after_warmup_and_syncs_at_both_marks():
    syncs, now = [], [0.0]
    window = bench.Window(
        steps_per_epoch=4, seconds=14, warmup_epochs=1, sync=lambda: syncs.append(1), clock=lambda: now[0]
    )
    stops = []
    for step in range(1, 30):
        now[0] = 3.0 * step  # every step takes 3 s
        stops.append(window.step_end(step))
    # the start mark after one pass (step 4); 14 s later falls inside the second timed pass (step 8 is only 12 s
    # after the start), so the window runs on to the next boundary, step 12
    assert window.start_step == 4 and window.end_step == 12 and stops.index(True) == 11
    assert window.elapsed == 24 and len(syncs) == 2
    assert all(stops[11:])  # stays closed
    with pytest.raises(RuntimeError, match="before the timing window closed"):
        _ = bench.Window(4, 10).elapsed


def test_counting_collate_counts_real_padded_and_squared_lengths():
    counting = bench.CountingCollate(pad_collate(0))
    counting(
        [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [4], "attention_mask": [1]}]
    )
    counting([{"input_ids": [5, 6], "attention_mask": [1, 1]}])
    assert counting.counts == [(4, 6, 10), (2, 2, 4)]
    assert counting.totals(1, 2) == (2, 2, 4) and counting.totals(0, 2) == (6, 8, 14)
    with pytest.raises(RuntimeError, match="only 2 batches"):
        counting.totals(0, 3)


def runs(tokens_per_s: dict[str, list[float]], workload: str = "w") -> list[dict]:
    return [
        {
            "workload": workload,
            "runner": runner,
            "repeat": repeat,
            "tokens_per_s": t,
            "samples_per_s": t / 10,
            "padding": 0.1,
            "peak_memory_mb": 1.0,
            "model_tflops_per_s": 0.0,
            "seconds": 20.0,
            "device": "cpu",
        }
        for runner, values in tokens_per_s.items()
        for repeat, t in enumerate(values)
    ]


def test_ratios_are_medians_of_paired_repeats():
    # the machine slows down over the run: repeat 2 is slow for both runners. Paired ratios see fit 10% faster
    # every time; the ratio of medians (110/200) would not.
    summary = bench.summarize(
        runs({"fit": [110, 220, 330], "trainer": [100, 200, 300], "bare": [120, 200, 300]})
    )
    fit_row = next(r for r in summary["runners"] if r["runner"] == "fit")
    assert fit_row["tokens_per_s"] == 220 and (fit_row["tokens_per_s_min"], fit_row["tokens_per_s_max"]) == (
        110,
        330,
    )
    ratios = {r["ratio"]: r for r in summary["ratios"]}
    assert set(ratios) == {"fit/trainer", "fit/bare"}  # only comparisons whose runners both ran
    assert ratios["fit/trainer"]["median"] == pytest.approx(1.1)
    assert ratios["fit/trainer"]["paired"] == pytest.approx([1.1, 1.1, 1.1])
    assert ratios["fit/trainer"]["verdict"] == "faster in all 3 repeats"
    assert ratios["fit/bare"]["median"] == pytest.approx(1.1)
    assert (ratios["fit/bare"]["min"], ratios["fit/bare"]["max"]) == pytest.approx((110 / 120, 1.1))
    assert ratios["fit/bare"]["verdict"] == "spread too wide to call a difference"
    table = bench.format_table(summary)
    assert (
        "fit/trainer" in table and "1.100" in table and "0.917-1.100" in table and "spread too wide" in table
    )


def test_grouped_comparisons_appear_when_their_runners_ran():
    tps = {
        "fit": [10, 10, 10],
        "fit-grouped": [16, 15, 17],
        "trainer": [10, 10, 10],
        "trainer-grouped": [15, 15, 15],
    }
    ratios = {r["ratio"]: r for r in bench.summarize(runs(tps))["ratios"]}
    assert set(ratios) == {
        "fit/trainer",
        "fit-grouped/trainer",
        "fit-grouped/trainer-grouped",
        "fit-grouped/fit",
    }
    assert ratios["fit-grouped/trainer"]["median"] == pytest.approx(1.6)
    assert ratios["fit-grouped/trainer-grouped"]["min"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([1.02, 1.05, 1.01], "faster in all 3 repeats"),
        ([0.97, 0.92, 0.995], "slower in all 3 repeats"),
        ([0.99, 1.01, 1.0], "level (all repeats within 5% around 1)"),
        ([0.9, 1.2, 1.0], "spread too wide to call a difference"),
        ([1.3, 1.4], "2 repeat(s): too few to call a difference"),
    ],
)
def test_verdict(ratios, expected):
    assert bench.verdict(ratios, tolerance=0.05) == expected


def test_verdict_tolerance_is_the_level_band():
    assert bench.verdict([0.98, 1.03, 1.0], tolerance=0.02) == "spread too wide to call a difference"
    assert bench.verdict([0.98, 1.03, 1.0], tolerance=0.06).startswith("level")


def test_bad_runner_is_refused(capsys):
    assert main(["bench", "--runners", "fit,trainr"]) == 2
    assert "Unknown runner(s) ['trainr']" in capsys.readouterr().err
    assert main(["bench", "--seconds", "0"]) == 2


def test_bare_loop_runs_under_autocast_and_stops_with_the_window():
    model = tiny_gpt()
    dtypes = set()
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    loader = make_loader(gpt_rows(12), 4, pad_collate(0), group_by_length=True)
    syncs = []
    window = bench.Window(steps_per_epoch=3, seconds=0.0, sync=lambda: syncs.append(1))
    config = TrainConfig(max_steps=bench.NOMINAL_STEPS, lr=1e-3, warmup=0.1)
    bench.run_bare_loop(model, loader, config, window, "cpu", precision="bf16")
    assert dtypes == {torch.bfloat16}  # forward under bf16 autocast, as fit's accelerator runs it
    assert (window.start_step, window.end_step) == (3, 6) and len(syncs) == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast of the weights


def test_bare_loop_scales_the_loss_under_fp16(monkeypatch):
    scaled = []
    original = torch.amp.GradScaler.scale

    def spy(self, outputs):
        result = original(self, outputs)
        scaled.append(float((result / outputs).detach()))
        return result

    monkeypatch.setattr(torch.amp.GradScaler, "scale", spy)
    window = bench.Window(steps_per_epoch=3, seconds=0.0)
    config = TrainConfig(max_steps=bench.NOMINAL_STEPS, lr=1e-3)
    bench.run_bare_loop(
        tiny_gpt(), make_loader(gpt_rows(12), 4, pad_collate(0)), config, window, "cpu", "fp16"
    )
    assert scaled and all(s > 1 for s in scaled)  # loss scaling on (fp32: the scaler is a no-op)
    scaled.clear()
    bench.run_bare_loop(
        tiny_gpt(), make_loader(gpt_rows(12), 4, pad_collate(0)), config, bench.Window(3, 0.0), "cpu", "no"
    )
    assert scaled == [1.0] * 6


def test_fit_runner_stops_when_the_window_closes():
    syncs = []
    window = bench.Window(steps_per_epoch=3, seconds=0.0, warmup_epochs=2, sync=lambda: syncs.append(1))
    config = TrainConfig(
        max_steps=bench.NOMINAL_STEPS, lr=1e-3, warmup=0.1, log_every=bench.NOMINAL_STEPS, progress=False
    )
    counting = bench.CountingCollate(pad_collate(0))
    bench.run_fit(tiny_gpt(), make_loader(gpt_rows(12), 4, counting), config, window)
    assert (window.start_step, window.end_step) == (6, 9) and len(syncs) == 2
    assert len(counting.counts) >= 9 and counting.totals(6, 9)[0] > 0


@pytest.mark.slow
def test_bench_runs_every_runner(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--workload",
                "tiny-gpt",
                "--runners",
                ",".join(bench.RUNNERS),
                "--seconds",
                "0.01",
                "--pool-batches",
                "2",
                "--repeats",
                "1",
                "--batch-size",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [r["runner"] for r in report["runs"]] == list(bench.RUNNERS)
    assert all(r["tokens_per_s"] > 0 and r["steps"] % 2 == 0 and r["epochs"] >= 1 for r in report["runs"])
    assert all(r["padding"] == 0 for r in report["runs"])  # packed blocks: nothing to pad
    ratios = {r["ratio"] for r in report["ratios"]}
    assert {"fit/trainer", "fit/bare", "fit-grouped/trainer", "fit-grouped/trainer-grouped"} <= ratios
    printed = capsys.readouterr().out
    assert "paired ratios" in printed and "too few to call a difference" in printed


def test_spawn_order_alternates_between_repeats(monkeypatch, capsys):
    calls = []

    def fake_spawn(workload, runner, args):
        calls.append(runner)
        return runs({runner: [100.0]}, workload)[0] | {"epochs": 1}

    monkeypatch.setattr(bench, "spawn_worker", fake_spawn)
    args = argparse.Namespace(
        worker=None,
        runners="fit,trainer,bare",
        workload="tiny-gpt",
        repeats=3,
        tolerance=0.05,
        seconds=1.0,
        warmup_epochs=1,
        pool_batches=None,
        batch_size=4,
        threads=None,
        seed=0,
        json=None,
    )
    assert bench.main(args) == 0
    assert calls == list(
        itertools.chain(["fit", "trainer", "bare"], ["bare", "trainer", "fit"], ["fit", "trainer", "bare"])
    )
    assert "level" in capsys.readouterr().out  # equal speeds in every repeat


# --------------------------------------------------------------------------------------------------------------
# The infer workload


def save_tiny_classifier(folder, layers: int, card: dict | None = None, seed: int = 0) -> None:
    from transformers import BertTokenizerFast

    from mfkit import classify

    torch.manual_seed(seed)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=60,
            hidden_size=16,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=2,
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder.parent / "vocab.txt"
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *"abcdefghijklmnopqrstuvwxyz",
        "the",
        "you",
        "free",
    ]
    vocab.write_text("\n".join(words))
    classify.save_classifier(model, BertTokenizerFast(vocab_file=str(vocab)), folder, card=card)


def infer_args(artifacts, **kw) -> argparse.Namespace:
    values = dict(
        worker=None,
        runners=None,
        workload="infer",
        repeats=3,
        tolerance=0.05,
        seconds=1.0,
        warmup_epochs=1,
        pool_batches=None,
        batch_size=None,
        threads=1,
        seed=0,
        json=None,
        artifacts=str(artifacts),
        max_length=None,
        int8_scales="per-channel",
    )
    return argparse.Namespace(**{**values, **kw})


def test_infer_ratios_are_paired_per_repeat_and_f1_comes_from_the_cards():
    def run(variant, repeat, latency, throughput, size):
        return {
            "workload": "infer",
            "runner": variant,
            "repeat": repeat,
            "latency_ms": latency,
            "throughput": throughput,
            "size_mb": size,
            "params": 10,
        }

    # repeat 1 is slow for both: the paired ratios stay at 2, the ratio of medians would not
    results = [
        run("teacher", 0, 10, 100, 80),
        run("student", 0, 5, 200, 60),
        run("teacher", 1, 40, 25, 80),
        run("student", 1, 20, 50, 60),
        run("teacher", 2, 12, 90, 80),
        run("student", 2, 6, 180, 60),
    ]
    rows = {r["variant"]: r for r in bench.summarize_infer(results, {"teacher": 0.95, "student": 0.94})}
    assert set(rows) == {"teacher", "student"}
    assert rows["student"]["speedup"] == pytest.approx(2.0) and rows["student"][
        "throughput_x"
    ] == pytest.approx(2.0)
    assert rows["student"]["size_x"] == pytest.approx(0.75) and rows["teacher"]["speedup"] == pytest.approx(
        1.0
    )
    assert rows["student"]["throughput_x_verdict"] == "faster in all 3 repeats"
    assert rows["student"]["latency_ms"] == 6 and rows["student"]["test_f1"] == 0.94
    table = bench.format_infer_table(list(rows.values()), {"pruned": "18"})
    assert "pruned        not built: run notebook 18" in table and "2.00 (2.00-2.00)" in table


def test_infer_measures_every_variant_found_and_lists_the_missing(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    save_tiny_classifier(
        models / "03-classifier", 4, {"settings": {"max_length": 16}, "scores": {"test_f1": 0.9}}
    )
    save_tiny_classifier(models / "16-student", 2, {"settings": {}, "scores": {"test_f1": 0.88}})
    order = []

    def in_process(workload, variant, args):  # the worker's own code, without a new interpreter
        order.append(variant)
        assert workload == "infer" and args.max_length == 16 and args.batch_size == 32
        return bench.run_infer_worker(
            variant, args.artifacts, args.batch_size, args.max_length, args.threads, args.int8_scales
        )

    scales = []
    quantize = mfkit.quantize.quantize_dynamic_int8
    monkeypatch.setattr(
        mfkit.quantize,
        "quantize_dynamic_int8",
        lambda model, per_channel: scales.append(per_channel) or quantize(model, per_channel),
    )
    monkeypatch.setattr(bench, "spawn_worker", in_process)
    out = tmp_path / "infer.json"
    assert bench.main(infer_args(tmp_path, repeats=2, json=str(out), int8_scales="per-tensor")) == 0
    assert (
        scales == [False] * 4
    )  # one scale per tensor (per row costs more than it saves at these tiny sizes)
    variants = ["teacher", "teacher-int8", "student", "student-int8"]
    assert order == variants + variants[::-1]  # interleaved, reversed every other repeat
    printed = capsys.readouterr().out
    assert "pruned        not built: run notebook 18" in printed and "pruned-int8" in printed
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["student"]["test_f1"] == 0.88 and rows["teacher-int8"]["test_f1"] is None
    assert rows["student"]["params"] < rows["teacher"]["params"] == rows["teacher-int8"]["params"]
    assert rows["teacher-int8"]["size_mb"] < rows["teacher"]["size_mb"]  # int8 weights take less space
    assert all(r["threads"] == 1 and r["max_length"] == 16 for r in report["runs"])
    assert "int8 weights with per-tensor scales" in printed
    scales.clear()
    assert bench.main(infer_args(tmp_path, repeats=1)) == 0  # by default one scale per output row
    assert scales == [True] * 2 and "int8 weights with per-channel scales" in capsys.readouterr().out


def test_infer_without_a_teacher_says_which_notebook_to_run(tmp_path, capsys):
    assert bench.main(infer_args(tmp_path)) == 2
    assert "run notebook 03" in capsys.readouterr().err
