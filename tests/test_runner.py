"""Tests of the chain runner (`mfkit run`, `mfkit results`) on tiny notebooks made on the fly.

The `notebooks`-marked tests start real kernels through papermill (a few seconds in all); the others replace
`papermill.execute_notebook` with a stand-in and check the chain logic alone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import nbformat
import papermill
import pytest
from helpers import run_cli

from mfkit import cli, runner
from mfkit.errors import MfkitError
from mfkit.paths import ARTIFACTS_ENV

# Writes the ledger the way mfkit.record does: ARTIFACTS_DIR/results/<notebook>.json.
RECORD = """\
ledger = pathlib.Path(ARTIFACTS_DIR) / "results" / "{stem}.json"
ledger.parent.mkdir(parents=True, exist_ok=True)
ledger.write_text(json.dumps({{
    "accuracy": 0.912345 * SCALE,
    "steps": 7,
    "profile": PROFILE,
    "artifacts_dir": ARTIFACTS_DIR,
    "scale": SCALE,
    "model": MODEL,
    "cwd": os.getcwd(),
    "env": os.environ.get("MFKIT_ARTIFACTS_DIR"),
}}))
"""
PARAMETERS = 'PROFILE = "cpu"\nARTIFACTS_DIR = "artifacts"\nSCALE = 1\nMODEL = "minilm"'


def make_notebook(folder: Path, stem: str, body: str, requires: tuple[str, ...] = ()) -> Path:
    """Write `folder/stem.ipynb`: a title, an imports cell, a tagged parameters cell, then `body`."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# {stem}"),
        nbformat.v4.new_code_cell("import json\nimport os\nimport pathlib"),
        params,
        nbformat.v4.new_code_cell(body),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if requires:
        nb.metadata["mfkit"] = {"requires": list(requires)}
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


def make_chain(folder: Path) -> Path:
    """Five notebooks: one records, one raises, two depend on it (directly, transitively), one is independent."""
    folder.mkdir(parents=True, exist_ok=True)
    make_notebook(folder, "01_record", RECORD.format(stem="01_record"))
    make_notebook(folder, "02_boom", 'raise ValueError("boom on purpose")')
    make_notebook(folder, "03_needs-boom", RECORD.format(stem="03_needs-boom"), ("02_boom",))
    make_notebook(folder, "04_needs-03", RECORD.format(stem="04_needs-03"), ("03_needs-boom",))
    make_notebook(folder, "05_independent", RECORD.format(stem="05_independent"), ("01_record",))
    (folder / "notes.ipynb").write_text("not a chain notebook")  # ignored: no NN_ prefix
    return folder


# --- the real thing, through papermill ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the five-notebook chain once with papermill; share the result between tests."""
    root = tmp_path_factory.mktemp("chain")
    notebooks = make_chain(root / "notebooks")
    output = root / "run"
    env_before = os.environ.get(ARTIFACTS_ENV)
    code, printed = run_cli(
        "run", "--notebooks", str(notebooks), "--output", str(output), "--param", "SCALE=3", "MODEL=tiny-gpt"
    )
    summary = json.loads((output / "summary.json").read_text())
    return {
        "code": code,
        "printed": printed,
        "summary": summary,
        "output": output,
        "notebooks": notebooks,
        "env_before": env_before,
    }


@pytest.mark.notebooks
def test_statuses_and_exit_code(chain_run: dict[str, Any]) -> None:
    statuses = {stem: e["status"] for stem, e in chain_run["summary"]["notebooks"].items()}
    assert statuses == {
        "01_record": "ok",
        "02_boom": "failed",
        "03_needs-boom": "skipped",
        "04_needs-03": "skipped",
        "05_independent": "ok",
    }
    assert chain_run["code"] == 1


@pytest.mark.notebooks
def test_summary_json(chain_run: dict[str, Any]) -> None:
    summary, output = chain_run["summary"], chain_run["output"]
    assert summary["profile"] == "smoke"
    assert summary["ok"] is False
    assert summary["output_dir"] == str(output.resolve())
    assert summary["artifacts_dir"] == str((output / "artifacts").resolve())
    assert summary["parameters"] == {"SCALE": 3, "MODEL": "tiny-gpt"}
    first = summary["notebooks"]["01_record"]
    assert first["metrics"]["accuracy"] == pytest.approx(0.912345 * 3)
    assert first["metrics"]["steps"] == 7
    assert first["error"] is None and first["seconds"] > 0
    assert Path(first["output"]).is_file()
    assert Path(first["output"]) == output.resolve() / "notebooks" / "01_record.ipynb"
    skipped = summary["notebooks"]["04_needs-03"]
    assert skipped["output"] is None and skipped["metrics"] == {}
    assert "02_boom (failed)" in skipped["error"] and "03_needs-boom (skipped)" in skipped["error"]


@pytest.mark.notebooks
def test_parameters_reach_the_notebook(chain_run: dict[str, Any]) -> None:
    metrics = chain_run["summary"]["notebooks"]["01_record"]["metrics"]
    artifacts = chain_run["summary"]["artifacts_dir"]
    assert metrics["profile"] == "smoke"
    assert metrics["artifacts_dir"] == artifacts and Path(artifacts).is_absolute()
    assert metrics["scale"] == 3  # a Python literal, not the string "3"
    assert metrics["model"] == "tiny-gpt"  # not a literal: passed as a string
    assert metrics["cwd"] == str(chain_run["notebooks"].resolve())  # runs in the notebooks folder
    assert metrics["env"] == artifacts  # the kernel sees MFKIT_ARTIFACTS_DIR too
    assert os.environ.get(ARTIFACTS_ENV) == chain_run["env_before"]  # ...and the runner restored it
    executed = nbformat.read(chain_run["output"] / "notebooks" / "01_record.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "SCALE = 3" in injected[0].source


@pytest.mark.notebooks
def test_failure_names_notebook_cell_and_error(chain_run: dict[str, Any]) -> None:
    error = chain_run["summary"]["notebooks"]["02_boom"]["error"]
    # the 4th cell of the source notebook; In [4] because papermill's injected cell also ran
    assert error.startswith("02_boom failed in cell 4 (In [4]: raise ValueError")
    assert "ValueError: boom on purpose" in error
    assert error in chain_run["printed"] or error.splitlines()[0] in chain_run["printed"]


@pytest.mark.notebooks
def test_printed_table(chain_run: dict[str, Any]) -> None:
    printed = chain_run["printed"]
    rows = [line for line in printed.splitlines() if line.startswith("01_record ")]
    assert len(rows) == 2  # once while running, once in the final table
    assert "accuracy=2.737 steps=7" in rows[0]  # floats to 4 significant digits
    assert "1 failed" in printed and "2 ok" in printed and "2 skipped" in printed


@pytest.mark.notebooks
def test_results_command_reprints_the_table(chain_run: dict[str, Any]) -> None:
    code, printed = run_cli("results", "--output", str(chain_run["output"]))
    assert code == 0
    assert "05_independent" in printed and "accuracy=2.737" in printed
    assert "02_boom failed in cell 4" in printed


@pytest.mark.notebooks
def test_only_runs_a_notebook_whose_prerequisite_never_ran(chain_run: dict[str, Any], tmp_path: Path) -> None:
    code, printed = run_cli(
        "run", "--notebooks", str(chain_run["notebooks"]), "--output", str(tmp_path), "--only", "5"
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 0, printed
    assert list(summary["notebooks"]) == ["05_independent"]
    assert summary["notebooks"]["05_independent"]["metrics"]["scale"] == 1  # the notebook's own default


# --- the chain logic, with papermill stubbed out --------------------------------------------------------------


@pytest.fixture
def fake_papermill(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace papermill.execute_notebook: notebooks named *boom* fail in their last cell, others record `ran=1`."""
    calls: list[dict[str, Any]] = []

    def execute_notebook(input_path: Path, output_path: Path, **kwargs: Any) -> None:
        calls.append({"input": Path(input_path), "output": Path(output_path), **kwargs})
        stem = Path(input_path).stem
        if "boom" in stem:
            raise papermill.PapermillExecutionError(
                4, 3, "1 / 0", "ZeroDivisionError", "division by zero", []
            )
        ledger = Path(kwargs["parameters"]["ARTIFACTS_DIR"]) / "results" / f"{stem}.json"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.write_text(json.dumps({"ran": 1, "loss": 1 / 3}))

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    return calls


def test_papermill_call(fake_papermill: list[dict[str, Any]], tmp_path: Path) -> None:
    notebooks = make_chain(tmp_path / "nb")
    code, _ = run_cli(
        "run",
        "--notebooks",
        str(notebooks),
        "--output",
        str(tmp_path / "out"),
        "--only",
        "1",
        "--profile",
        "cpu",
        "--timeout",
        "30",
    )
    assert code == 0
    (call,) = fake_papermill
    assert call["kernel_name"] == "python3"
    assert call["cwd"] == notebooks.resolve()
    assert call["progress_bar"] is False and call["log_output"] is False
    assert call["execution_timeout"] == 30
    assert call["parameters"] == {
        "PROFILE": "cpu",
        "ARTIFACTS_DIR": str((tmp_path / "out" / "artifacts").resolve()),
    }
    assert call["output"] == (tmp_path / "out" / "notebooks" / "01_record.ipynb").resolve()


def test_transitive_skip_through_unselected_notebook(
    fake_papermill: list[dict[str, Any]], tmp_path: Path
) -> None:
    notebooks = make_chain(tmp_path / "nb")
    report = runner.run_chain(notebooks=notebooks, output=tmp_path / "out", only=["02", "04", "05"])
    statuses = {stem: e["status"] for stem, e in report.summary["notebooks"].items()}
    # 04 needs 03 (not selected), which needs 02 (failed): skipped all the same
    assert statuses == {"02_boom": "failed", "04_needs-03": "skipped", "05_independent": "ok"}
    assert [c["input"].stem for c in fake_papermill] == ["02_boom", "05_independent"]
    assert report.exit_code == 1
    assert report.summary["notebooks"]["02_boom"]["error"].startswith(
        "02_boom failed in cell 4 (In [3]: 1 / 0): ZeroDivisionError: division by zero"
    )


def test_side_by_side_waits_for_prerequisites_and_overlaps_the_rest(
    fake_papermill: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jobs=2`: a notebook starts only after the chosen notebooks it needs end; independent ones overlap; the
    outcomes and the summary's order are those of a run one at a time; kernels get a share of the cores."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    spans: dict[str, tuple[float, float]] = {}
    threads: dict[str, str | None] = {}
    stub = papermill.execute_notebook

    def timed(input_path: Path, output_path: Path, **kwargs: Any) -> None:
        started = time.monotonic()
        threads[Path(input_path).stem] = os.environ.get("OMP_NUM_THREADS")
        time.sleep(0.3)
        try:
            stub(input_path, output_path, **kwargs)
        finally:
            spans[Path(input_path).stem] = (started, time.monotonic())

    monkeypatch.setattr(papermill, "execute_notebook", timed)
    notebooks = make_chain(tmp_path / "nb")
    one = runner.run_chain(notebooks=notebooks, output=tmp_path / "one")
    spans.clear()
    two = runner.run_chain(notebooks=notebooks, output=tmp_path / "two", jobs=2)

    assert list(two.summary["notebooks"]) == list(one.summary["notebooks"])  # number order
    assert {s: e["status"] for s, e in two.summary["notebooks"].items()} == {
        s: e["status"] for s, e in one.summary["notebooks"].items()
    }
    assert set(spans) == {"01_record", "02_boom", "05_independent"}  # 03 and 04 skipped after 02 failed
    assert spans["05_independent"][0] >= spans["01_record"][1]  # waited for what it needs
    assert spans["02_boom"][0] < spans["01_record"][1]  # ran beside 01
    assert set(threads.values()) == {"1"} and two.summary["jobs"] == 2
    assert two.summary["machine"]["kind"]


def test_side_by_side_waits_for_the_notebooks_read_after_but_runs_when_they_fail(
    fake_papermill: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`after` (as 20's waterfall reads 18's results): with jobs=2 the reader starts once they end, and runs even
    where one of them failed (a `requires` would skip it)."""
    spans: dict[str, tuple[float, float]] = {}
    stub = papermill.execute_notebook

    def timed(input_path: Path, output_path: Path, **kwargs: Any) -> None:
        started = time.monotonic()
        time.sleep(0.3 if Path(input_path).stem == "01_slow-boom" else 0.0)
        try:
            stub(input_path, output_path, **kwargs)
        finally:
            spans[Path(input_path).stem] = (started, time.monotonic())

    monkeypatch.setattr(papermill, "execute_notebook", timed)
    folder = tmp_path / "nb"
    folder.mkdir()
    make_notebook(folder, "01_slow-boom", 'raise ValueError("boom on purpose")')
    reader = make_notebook(folder, "02_reader", RECORD.format(stem="02_reader"))
    nb = nbformat.read(reader, as_version=4)
    nb.metadata["mfkit"] = {"after": ["01_slow-boom"]}
    nbformat.write(nb, reader)
    report = runner.run_chain(notebooks=folder, output=tmp_path / "out", jobs=2)
    assert {s: e["status"] for s, e in report.summary["notebooks"].items()} == {
        "01_slow-boom": "failed",
        "02_reader": "ok",
    }
    assert spans["02_reader"][0] >= spans["01_slow-boom"][1]


def test_side_by_side_refuses_notebooks_that_require_each_other(
    fake_papermill: list[dict[str, Any]], tmp_path: Path
) -> None:
    folder = tmp_path / "nb"
    folder.mkdir()
    make_notebook(folder, "01_a", RECORD.format(stem="01_a"), ("02_b",))
    make_notebook(folder, "02_b", RECORD.format(stem="02_b"), ("01_a",))
    with pytest.raises(MfkitError, match="require each other"):
        runner.run_chain(notebooks=folder, output=tmp_path / "out", jobs=2)
    assert fake_papermill == []


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(MfkitError, match="--jobs"):
        runner.run_chain(notebooks=make_chain(tmp_path / "nb"), output=tmp_path / "out", jobs=0)


def test_artifacts_dir_param_and_stale_ledger(fake_papermill: list[dict[str, Any]], tmp_path: Path) -> None:
    notebooks = make_chain(tmp_path / "nb")
    artifacts = tmp_path / "elsewhere"
    stale = artifacts / "results" / "02_boom.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"accuracy": 0.99}))
    report = runner.run_chain(
        notebooks=notebooks,
        output=tmp_path / "out",
        only=["1", "2"],
        params={"ARTIFACTS_DIR": str(artifacts)},
    )
    assert report.summary["artifacts_dir"] == str(artifacts.resolve())
    assert report.summary["notebooks"]["01_record"]["metrics"] == {"ran": 1, "loss": pytest.approx(1 / 3)}
    assert report.summary["notebooks"]["02_boom"]["metrics"] == {}  # the earlier run's numbers were cleared
    assert fake_papermill[0]["parameters"]["ARTIFACTS_DIR"] == str(artifacts.resolve())


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--profile", "huge"], "--profile='huge'"),
        (["--only", "99"], "--only 99"),
        (["--only", "1,42"], "--only 42"),
        (["--from", "04", "--to", "02"], "--from 04"),
        (["--from", "x"], "--from 'x'"),
        (["--param", "SCALE"], "--param 'SCALE'"),
        (["--param", "scale=2"], "--param 'scale'"),
        (["--param", "SCALE=(1, 2)"], "tuple"),
        (["--param", "PROFILE=gpu"], "--profile"),
        (["--timeout", "0"], "--timeout"),
    ],
)
def test_bad_input_exits_2_with_one_message(
    argv: list[str], names: str, tmp_path: Path, fake_papermill: list, capsys: pytest.CaptureFixture[str]
) -> None:
    notebooks = make_chain(tmp_path / "nb")
    code = cli.main(["run", "--notebooks", str(notebooks), "--output", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mfkit run: ") and names in err and "Fix:" in err
    assert "Traceback" not in err
    assert not fake_papermill and not (tmp_path / "out" / "summary.json").exists()


def test_unknown_requirement_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_notebook(tmp_path, "01_only", "x = 1", requires=("00_typo",))
    assert cli.main(["run", "--notebooks", str(tmp_path)]) == 2
    assert "00_typo" in capsys.readouterr().err


def test_missing_notebooks_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--notebooks", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_results_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["results", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No run summary" in err and "mfkit run" in err


def test_argparse_errors_return_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["run", "--help"]) == 0
    assert "--param KEY=VALUE" in capsys.readouterr().out
    assert cli.main(["run", "--timeout", "soon"]) == 2


def test_bench_left_out_when_module_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    usage = cli.build_parser().format_usage()
    assert "run,results" in usage and "bench" not in usage


# --- small pieces ----------------------------------------------------------------------------------------------


def test_parse_params_reads_python_literals() -> None:
    params = runner.parse_params(
        [
            "MAX_STEPS=10",
            "LR=3e-4",
            "FLAG=True",
            "NONE=None",
            "LAYERS=[1, 2]",
            "MODEL=minilm",
            "QUOTED='7'",
            "URL=http://host/?a=b",
            "EMPTY=",
        ]
    )
    assert params == {
        "MAX_STEPS": 10,
        "LR": 3e-4,
        "FLAG": True,
        "NONE": None,
        "LAYERS": [1, 2],
        "MODEL": "minilm",
        "QUOTED": "7",
        "URL": "http://host/?a=b",
        "EMPTY": "",
    }


def test_select_and_prerequisites(tmp_path: Path) -> None:
    found = runner.discover(make_chain(tmp_path))
    assert [nb.stem for nb in found] == [
        "01_record",
        "02_boom",
        "03_needs-boom",
        "04_needs-03",
        "05_independent",
    ]
    assert [nb.number for nb in runner.select(found, start="2", end="04")] == ["02", "03", "04"]
    assert [nb.number for nb in runner.select(found, only=runner.parse_only("5,01"))] == ["01", "05"]
    assert [nb.number for nb in runner.select(found, only=["03_needs-boom"])] == ["03"]
    graph = {nb.stem: nb.requires for nb in found}
    assert runner.prerequisites("04_needs-03", graph) == {"03_needs-boom", "02_boom"}
    with pytest.raises(MfkitError, match="No notebook is selected"):
        runner.select(found, only=["1"], start="2")


def test_format_metrics() -> None:
    metrics = {
        "acc": 0.912345,
        "big": 123456.7,
        "steps": 30,
        "ok": True,
        "name": "x",
        "curve": [0.5, 0.3333333],
    }
    assert (
        runner.format_metrics(metrics)
        == "acc=0.9123 big=1.235e+05 steps=30 ok=True name=x curve=[0.5, 0.3333]"
    )
    assert runner.format_value("y" * 100).endswith("...") and len(runner.format_value("y" * 100)) == 40


# --- parameters per notebook, folders, failures, latest run, comparison ------------------------------------------


def test_params_go_only_to_notebooks_that_have_them(
    fake_papermill: list[dict[str, Any]], tmp_path: Path
) -> None:
    folder = tmp_path / "nb"
    make_chain(folder)
    make_notebook(folder, "06_other", RECORD.format(stem="06_other").replace("SCALE", "1"))
    nb = nbformat.read(folder / "06_other.ipynb", as_version=4)
    nb.cells[2].source = 'PROFILE = "cpu"\nARTIFACTS_DIR = "artifacts"\nMODEL = "minilm"\nWIDTH: int = 3'
    nbformat.write(nb, folder / "06_other.ipynb")
    runner.run_chain(
        notebooks=folder, output=tmp_path / "out", only=["1", "6"], params={"SCALE": 2, "WIDTH": 4}
    )
    sent = {c["input"].stem: c["parameters"] for c in fake_papermill}
    assert sent["01_record"] == {
        "PROFILE": "smoke",
        "ARTIFACTS_DIR": sent["01_record"]["ARTIFACTS_DIR"],
        "SCALE": 2,
    }
    assert "SCALE" not in sent["06_other"] and sent["06_other"]["WIDTH"] == 4
    with pytest.raises(MfkitError, match="no selected notebook"):
        runner.run_chain(notebooks=folder, output=tmp_path / "out", only=["6"], params={"SCALE": 2})


def test_parameter_names_of_a_cell() -> None:
    assert runner.parameter_names("A = 1\nB: int = 2\nC, D = 3, 4\n# E = 5\nif True:\n    F = 6") == {
        "A",
        "B",
        "C",
        "D",
    }
    assert runner.parameter_names("%matplotlib inline\nA = 1\nB=2") == {"A", "B"}  # not Python: read by lines


def test_failed_notebook_keeps_its_partial_numbers_apart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def execute_notebook(input_path: Path, output_path: Path, **kwargs: Any) -> None:
        ledger = Path(kwargs["parameters"]["ARTIFACTS_DIR"]) / "results" / f"{Path(input_path).stem}.json"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.write_text(json.dumps({"_run": {"seed": 0}, "val_f1": 0.5}))
        if "boom" in str(input_path):
            tb = [
                "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9",
                "\nThe above exception was the direct cause of the following exception:\n",
                "DatasetGenerationError: An error occurred while generating the dataset",
            ]
            raise papermill.PapermillExecutionError(
                4, 3, "load()", "DatasetGenerationError", "An error occurred while generating the dataset", tb
            )

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    out = tmp_path / "out"
    report = runner.run_chain(notebooks=make_chain(tmp_path / "nb"), output=out, only=["1", "2"])
    ok, failed = report.summary["notebooks"]["01_record"], report.summary["notebooks"]["02_boom"]
    assert ok["metrics"] == {"val_f1": 0.5} and ok["run"] == {"seed": 0}  # the run record is not a metric
    assert failed["metrics"] == {} and failed["partial_metrics"] == {"val_f1": 0.5}
    assert "caused by UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9" in failed["error"]
    assert not (out / "artifacts" / "results" / "02_boom.json").exists()  # no later notebook can read it
    assert Path(failed["partial_ledger"]) == out / "artifacts" / "results" / "failed" / "02_boom.json"
    table = runner.format_summary(report.summary)
    row = next(line for line in table.splitlines() if line.startswith("02_boom "))
    assert "val_f1" not in row and "NOT results" in table


def _summary(folder: Path, f1: float, lr: float) -> Path:
    folder.mkdir(parents=True)
    run = {"profile": "smoke", "seed": 0, "knobs": {"lr": lr, "max_steps": 10}}
    runner.write_summary(
        {
            "profile": "smoke",
            "ok": True,
            "started": "t",
            "seconds": 1.0,
            "output_dir": str(folder),
            "notebooks": {
                "03_x": {"status": "ok", "seconds": 1.0, "metrics": {"f1": f1, "name": "a"}, "run": run}
            },
        },
        folder,
    )
    return folder


def test_results_shows_the_latest_run_and_compares_two(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    older = _summary(tmp_path / "runs" / "smoke", 0.5, 1e-4)
    newer = _summary(tmp_path / "runs" / "mine" / "b", 0.75, 3e-4)
    os.utime(older / "summary.json", (1, 1))
    monkeypatch.setattr(runner, "runs_dir", lambda: tmp_path / "runs")
    code, printed = run_cli("results")
    assert code == 0 and "f1=0.75" in printed and str(newer / "summary.json") in printed
    code, printed = run_cli("results", "--compare", str(older), str(newer / "summary.json"))
    assert code == 0
    row = next(line for line in printed.splitlines() if line.strip().startswith("f1"))
    assert row.split() == ["f1", "0.5", "0.75", "+0.25"]
    assert "lr: 0.0001 -> 0.0003" in printed and "max_steps" not in printed
    code, printed = run_cli(
        "results", "--compare", "smoke", str(newer)
    )  # a profile name means runs/<profile>
    assert code == 0 and str(older) in printed


def test_results_latest_without_any_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runner, "runs_dir", lambda: tmp_path)
    assert cli.main(["results"]) == 2
    assert "No run summary" in capsys.readouterr().err


def test_interactive_notebooks_render_statically_unless_asked(
    fake_papermill: list[dict[str, Any]], tmp_path: Path
) -> None:
    folder = tmp_path / "nb"
    make_chain(folder)
    make_notebook(folder, "06_widgets", RECORD.format(stem="06_widgets"))
    nb = nbformat.read(folder / "06_widgets.ipynb", as_version=4)
    nb.cells[2].source = 'PROFILE = "cpu"\nARTIFACTS_DIR = "artifacts"\nINTERACTIVE = True'
    nbformat.write(nb, folder / "06_widgets.ipynb")
    runner.run_chain(notebooks=folder, output=tmp_path / "out", only=["1", "6"])
    sent = {c["input"].stem: c["parameters"] for c in fake_papermill}
    assert sent["06_widgets"]["INTERACTIVE"] is False and "INTERACTIVE" not in sent["01_record"]
    runner.run_chain(notebooks=folder, output=tmp_path / "out2", only=["6"], params={"INTERACTIVE": True})
    assert fake_papermill[-1]["parameters"]["INTERACTIVE"] is True
