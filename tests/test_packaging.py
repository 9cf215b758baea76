"""Packaging: what the wheel carries, what the kit declares, and the kit installed outside a clone.

The slow tests build a wheel from this checkout and install it into fresh virtual environments, each a copy of one
environment with torch and Jupyter only (made once per module), as a Colab runtime has. In one copy the notebooks'
own setup cells install the kit from the wheel with the versions CI tested and run 03, 05 and 06 in `smoke`, in
order, in one empty folder; the same copy then serves `mfkit notebooks` and `mfkit run` of a pip-installed kit. In
another copy the setup cells run with `MFKIT_LATEST=1`: the newest releases the registry serves, on the notebooks
most exposed to library changes (03, 05, 06, 07, 14).
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import inspect
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from torch import nn

from mfkit.bootstrap import project_table
from mfkit.data import SHIPPED
from mfkit.install import CONSTRAINTS, KERNEL_PACKAGES, LATEST_ENV, pins
from mfkit.notebook_cells import numbered, sync
from mfkit.paths import REPO_DIR, notebooks_dir
from mfkit.peft_utils import accept_past_key_values

TORCH = f"torch=={pins()['torch']}"  # the build a Colab-like runtime already has: the tested one, a CPU wheel here
JUPYTER = ("ipykernel", "papermill", "nbclient")
# The simulated Colab runtime, in order in one folder: 03 (data + MiniLM), 05 (03's classifier, every PEFT method),
# 06 (SmolLM2 from its GGUF file + sacrebleu).
COLAB_NOTEBOOKS = ("03_full-finetuning", "05_peft-lora", "06_instruction-tuning")
# The newest releases, on the notebooks most exposed to library changes: PEFT, generation, quantization.
LATEST_NOTEBOOKS = (
    "03_full-finetuning",
    "05_peft-lora",
    "06_instruction-tuning",
    "08_prompting-few-shot",
    "17_quantization",
)
# The fresh-runtime tests check the install path and the library APIs, not the numbers (the smoke chain checks those,
# with the same tested versions, against its baselines). So they run 03 on a tiny budget, which 05 reads from 03's
# card (every code path, every PEFT method, a fraction of the compute), and score fewer verses and mails in 06, 08.
FRESH_RUNTIME_PARAMS = {
    "03_full-finetuning": {"MAX_STEPS": 4, "EVAL_EVERY": 2, "TRAIN_LIMIT": 64, "EVAL_LIMIT": 32},
    "06_instruction-tuning": {"EVAL_VERSES": 2, "MAX_NEW_TOKENS": 8},
    "08_prompting-few-shot": {"EVAL_LIMIT": 8},
}
PYPROJECT = project_table() or pytest.skip(
    "reading pyproject.toml needs Python 3.11 (tomllib)", allow_module_level=True
)


def _names(requirements: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


# --- fast: what the project declares -------------------------------------------------------------------------


def _third_party_imports() -> set[str]:
    """Top-level modules that mfkit/ imports and the standard library does not provide."""
    found = set()
    for path in (REPO_DIR / "mfkit").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in {"mfkit", "__future__"}}


def test_every_direct_import_is_declared():
    core = _names(PYPROJECT["dependencies"])
    extras = set().union(*(_names(r) for r in PYPROJECT["optional-dependencies"].values()))
    owners = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in _third_party_imports():
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & (core | extras):
            undeclared[module] = sorted(dists)
    assert not undeclared, (
        f"mfkit imports these but pyproject.toml declares none of their distributions: {undeclared}"
    )


def test_dependencies_of_the_issue_are_declared():
    core = _names(PYPROJECT["dependencies"])
    extras = {k: _names(v) for k, v in PYPROJECT["optional-dependencies"].items()}
    assert {"sacrebleu", "scipy", "nbformat", "nbclient", "jupyter-client"} <= core
    assert "bitsandbytes" in extras["qlora"] and "tensorboard" in extras["dev"]
    assert PYPROJECT["urls"]["Repository"].startswith("https://github.com/")


def _fake_python(folder: Path, torch_installed: bool) -> Path:
    """A stand-in for .venv/bin/python that logs what `.ci/setup` asks of it instead of doing it."""
    log = folder / "calls.log"
    script = folder / ".venv" / "bin" / "python"
    script.parent.mkdir(parents=True)
    script.write_text(f"""#!/usr/bin/env bash
log={log}
case "$1 $2" in
  "-c import torch") exit {0 if torch_installed else 1} ;;
  "-m pip") echo "pip $*" >> "$log" ;;
  "mfkit/install.py "*) echo "install $*" >> "$log" ;;
  "-m mfkit.bootstrap") echo "bootstrap $*" >> "$log" ;;
  *) echo "python $*" >> "$log" ;;
esac
""")
    script.chmod(0o755)
    return log


@pytest.mark.parametrize(
    ("torch_installed", "chosen"),
    [(True, "torch==2.99.0+cu999"), (False, "torch==2.99.0+cu999"), (False, None)],
)
def test_ci_setup_installs_torch_once_then_the_kit_through_the_installer(tmp_path, torch_installed, chosen):
    """`.ci/setup` installs torch only where there is none (MFKIT_TORCH, else the tested one), then the kit through
    mfkit/install.py, which pins the torch now installed (tests/test_bootstrap.py), and the embedded models."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / "mfkit").mkdir()
    shutil.copy(REPO_DIR / ".ci" / "setup", tmp_path / ".ci" / "setup")
    shutil.copy(CONSTRAINTS, tmp_path / "mfkit" / CONSTRAINTS.name)
    log = _fake_python(tmp_path, torch_installed)
    env = {k: v for k, v in os.environ.items() if k != "MFKIT_TORCH"} | (
        {"MFKIT_TORCH": chosen} if chosen else {}
    )
    subprocess.run(["bash", str(tmp_path / ".ci" / "setup")], check=True, env=env, capture_output=True)
    calls = log.read_text().splitlines()
    installs_torch = [line for line in calls if line.startswith("pip") and "torch==" in line]
    assert installs_torch == ([] if torch_installed else [installs_torch[0]]), calls
    if not torch_installed:
        assert installs_torch[0].endswith(chosen or TORCH)
    (kit,) = [line for line in calls if line.startswith("install ")]
    assert kit.endswith("-e .[models,search,quantize,serve,lab,dev,align]"), calls
    assert "bootstrap -m mfkit.bootstrap" in calls and calls.index(kit) < calls.index(
        "bootstrap -m mfkit.bootstrap"
    )


def test_prefix_tuning_finds_a_backbone_that_calls_its_prefix_cache():
    """transformers 5.25 names forward's `past_key_values` `cache`; peft 0.21 looks for the old name."""

    class Backbone(nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            return input_ids, cache, kwargs

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert, self.classifier = Backbone(), nn.Linear(2, 2)

    model = Classifier()
    assert accept_past_key_values(model) == ["bert"]
    assert "past_key_values" in inspect.signature(model.bert.forward).parameters
    assert model.bert(input_ids=1, past_key_values="prefix") == (1, "prefix", {})
    assert model.bert(input_ids=1, cache="own") == (1, "own", {})  # a caller using the new name is unchanged
    clone = copy.deepcopy(model)
    assert clone.bert.forward.__self__ is clone.bert  # bound to the copy, not to the original
    assert accept_past_key_values(clone) == []  # once is enough


# --- slow: the wheel and fresh environments ----------------------------------------------------------------------


def _run(command: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> str:
    """Run `command`; on failure show its output."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh runtime: offline hub, no trace of this checkout's venv or of the repository."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "VIRTUAL_ENV",
            "PYTHONPATH",
            "MFKIT_ARTIFACTS_DIR",
            "MFKIT_DATA_DIR",
            "MFKIT_SOURCE",
            LATEST_ENV,
            "JUPYTER_PATH",
        }
    }
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", **extra
    )
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(REPO_DIR), "-w", str(out)])
    (found,) = out.glob("mfkit-*.whl")
    return found


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """A virtual environment with torch and Jupyter and nothing of mfkit, as a Colab runtime has (made once)."""
    venv = tmp_path_factory.mktemp("venv") / "base"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", TORCH, *JUPYTER], env=_clean_env())
    return venv


def _fresh_copy(base: Path, target: Path) -> Path:
    """A copy of the base environment (a venv finds its prefix from its own location, so a copy works)."""
    shutil.copytree(base, target, symlinks=True)
    return target / "bin" / "python"


def _site_packages(python: Path) -> Path:
    return Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    )


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _torch(python: Path) -> str:
    return _run([str(python), "-c", "import torch; print(torch.__version__)"])


def _drift(python: Path) -> str:
    """What `python -m mfkit.install --drift` says in that environment: the versions that differ from the tested."""
    result = subprocess.run([str(python), "-m", "mfkit.install", "--drift"], capture_output=True, text=True)
    return result.stdout.strip() or f"(mfkit.install could not run: {result.stderr.strip()[-500:]})"


def _only_kernel_packages_differ(python: Path) -> None:
    """Every package CI pins is at its tested version, but for the runtime's own kernel packages, which the setup
    cell leaves as they were (mfkit.install.KERNEL_PACKAGES)."""
    drift = _drift(python)
    if not drift.startswith("every installed package"):
        differing = {line.split()[0] for line in drift.splitlines()}
        assert differing <= set(KERNEL_PACKAGES), drift


def _run_in_one_folder(python: Path, stems: tuple[str, ...], work: Path, env: dict) -> dict[str, float]:
    """Copy the notebooks into `work` and run them there in order in `smoke` (with FRESH_RUNTIME_PARAMS), each
    through its own setup cell (papermill, as a learner's runtime would); return the seconds of each. Stops at the
    first failure."""
    work.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        shutil.copy(notebooks_dir() / f"{stem}.ipynb", work / f"{stem}.ipynb")
    sync(work)  # the rendered setup cell, whether or not the repository's notebooks are synced yet
    seconds = {}
    for stem in stems:
        start = time.perf_counter()
        command = [str(python), "-m", "papermill", f"{stem}.ipynb", f"{stem}.out.ipynb", "-k", "python3"]
        params = {"PROFILE": "smoke", **FRESH_RUNTIME_PARAMS.get(stem, {})}
        command += [arg for name, value in params.items() for arg in ("-p", name, str(value))]
        _run([*command, "--cwd", str(work)], cwd=work, env=env, timeout=1800)
        seconds[stem] = round(time.perf_counter() - start, 1)
        assert (
            work / "artifacts" / "results" / f"{stem}.json"
        ).is_file()  # artifacts go to the working folder
    return seconds


@pytest.fixture(scope="module")
def colab_runtime(base_venv, tmp_path_factory) -> Path:
    """The Python of a Colab-like runtime without the kit: shared by the Colab simulation, which installs the kit
    through the notebooks' setup cell, and the pip-installed chain, which reuses that install."""
    return _fresh_copy(base_venv, tmp_path_factory.mktemp("colab") / "runtime")


@pytest.mark.slow
def test_wheel_carries_data_and_notebooks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mfkit/_data/{name}.jsonl.gz" for name in SHIPPED} <= names
    assert "mfkit/_data/DATASHEET.md" in names
    assert "mfkit/_data/wordnet_synonyms.json.gz" in names  # the EDA synonym table (mfkit.augment)
    assert {f"mfkit/_notebooks/{p.name}" for p in numbered(notebooks_dir())} <= names
    assert {"mfkit/constraints.txt", "mfkit/install.py"} <= names  # the tested versions, for the setup cell
    assert zipfile.ZipFile(wheel).read("mfkit/constraints.txt") == CONSTRAINTS.read_bytes()
    metadata = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    )
    assert f"Project-URL: Repository, {PYPROJECT['urls']['Repository']}" in metadata
    assert "Requires-Dist: sacrebleu" in metadata


@pytest.mark.slow
@pytest.mark.notebooks
def test_fresh_colab_runtime_runs_03_05_06_in_one_folder(wheel, colab_runtime, tmp_path_factory):
    """A runtime with torch and Jupyter only, one empty folder: the first notebook's setup cell installs the kit
    (from the wheel, via MFKIT_SOURCE) with the tested versions and the embedded models, the next ones find it;
    03, 05 (from 03's classifier) and 06 run in `smoke`. Torch stays as it was, nothing lands in site-packages."""
    python = colab_runtime
    torch_before = _torch(python)
    work = tmp_path_factory.mktemp("colab") / "content"
    env = _clean_env(MFKIT_SOURCE=str(wheel), MFKIT_CACHE=str(work.parent / "cache"))
    seconds = _run_in_one_folder(python, COLAB_NOTEBOOKS, work, env)
    print("seconds per notebook:", seconds)
    assert _torch(python) == torch_before
    _only_kernel_packages_differ(python)
    site = _site_packages(python)
    assert (site / "mfkit" / "_data" / "spam.jsonl.gz").is_file()
    assert not (site / "artifacts").exists() and not (site / "runs").exists()


@pytest.mark.slow
@pytest.mark.notebooks
def test_pip_installed_kit_runs_the_chain_outside_a_clone(wheel, colab_runtime, tmp_path):
    """The kit installed from the wheel (by the Colab simulation above, or here the same two steps when this test
    runs alone), then `mfkit notebooks nb`, `cd nb && mfkit run --profile smoke --to 01`: it passes and writes
    nothing into site-packages. (00 and 01 read the shipped data and the embedded model from the package; the
    Colab simulation has already trained in this runtime.)"""
    python = colab_runtime
    env = _clean_env(MFKIT_CACHE=str(tmp_path / "cache"))
    site = _site_packages(python)
    if not (site / "mfkit").is_dir():
        _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], env=env)
        _run([str(python), str(site / "mfkit" / "install.py"), str(wheel)], env=env)
    _run([str(python), "-m", "mfkit.bootstrap"], cwd=tmp_path, env=env)
    before = _listing(site)
    mfkit = [str(python), "-m", "mfkit.cli"]
    _run([*mfkit, "notebooks", "nb"], cwd=tmp_path, env=env)
    out = _run(
        [*mfkit, "run", "--profile", "smoke", "--to", "01", "--jobs", "2"],
        cwd=tmp_path / "nb",
        env=env,
        timeout=1800,
    )
    assert "2 ok" in out, out
    assert (tmp_path / "nb" / "runs" / "smoke" / "summary.json").is_file()
    assert _listing(site) == before, sorted(_listing(site) ^ before)[:20]
    doctor = _run([*mfkit, "doctor"], cwd=tmp_path, env=env)
    assert "MISSING" not in doctor
    _only_kernel_packages_differ(python)


@pytest.mark.slow
@pytest.mark.notebooks
def test_newest_releases_run_the_notebooks_most_exposed_to_them(wheel, base_venv, tmp_path):
    """The same runtime and folder with MFKIT_LATEST=1: the setup cell installs the newest releases the kit's lower
    bounds allow, and 03, 05, 06, 07 and 14 run in `smoke`. A failure names the versions that differ from the
    tested ones (drift a learner on a fresh runtime meets before CI's pinned runs do)."""
    python = _fresh_copy(base_venv, tmp_path / "runtime")
    torch_before = _torch(python)
    work = tmp_path / "content"
    env = _clean_env(MFKIT_SOURCE=str(wheel), MFKIT_CACHE=str(tmp_path / "cache"), **{LATEST_ENV: "1"})
    try:
        seconds = _run_in_one_folder(python, LATEST_NOTEBOOKS, work, env)
    except AssertionError as exc:
        raise AssertionError(
            f"on the newest releases, which differ from mfkit/constraints.txt in:\n{_drift(python)}\n\n{exc}"
        ) from None
    print("seconds per notebook:", seconds, "\nversions that differ from the tested ones:\n" + _drift(python))
    assert _torch(python) == torch_before
