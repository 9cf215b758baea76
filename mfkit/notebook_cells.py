"""The cells every notebook shares, generated from one place, and copies of the notebooks for an installed kit.

- `render_setup_cell()`: the setup cell (first line `# mfkit setup`), the same in every notebook. Where `mfkit`
  is importable it only imports it; in a bare runtime (Colab, Kaggle, a new venv) it pip-installs the kit alone
  from `$MFKIT_SOURCE` (default `git+<repository URL>`), then runs the kit's `install.py` by its path, which
  installs it again with its dependencies at the versions CI tested (`mfkit/constraints.txt`; the newest with
  `MFKIT_LATEST=1`), keeping the installed torch; then `mfkit.bootstrap.ensure()` installs the embedded models.
  It holds only what must run before `mfkit` can be imported.
- `render_badge(name)`: the "Open in Colab" badge of a notebook, for its first cell and the README's table.
- `sync(folder)` rewrites both in every numbered notebook; `check(folder)` lists those out of date.

    python -m mfkit.notebook_cells sync [NOTEBOOKS_DIR]
    python -m mfkit.notebook_cells check [NOTEBOOKS_DIR] [--readme README.md]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat

from .bootstrap import SOURCE_ENV, repository_url
from .errors import MfkitError
from .install import LATEST_ENV
from .paths import NOTEBOOK_GLOB, notebooks_dir

SETUP_MARKER = "# mfkit setup"
LEGACY_SETUP = 'find_spec("mfkit")'  # the setup cell before this module existed
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BRANCH = "main"

SETUP_CELL = f"""{SETUP_MARKER}: a no-op where mfkit is installed. In a bare runtime (Colab, Kaggle, a new venv) it installs
# the kit from ${SOURCE_ENV} at the versions CI tested (${LATEST_ENV}=1: the newest), keeping the torch there.
import importlib.util, os, subprocess, sys  # noqa: E401

if importlib.util.find_spec("mfkit") is None:  # the kit alone, then its install.py adds its dependencies
    source = os.environ.get("{SOURCE_ENV}", "{{source}}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", source], check=True)
    importlib.invalidate_caches()
    kit = importlib.util.find_spec("mfkit").submodule_search_locations[0]
    subprocess.run([sys.executable, os.path.join(kit, "install.py"), source], check=True)
    importlib.invalidate_caches()
import mfkit.bootstrap

mfkit.bootstrap.ensure()
env = mfkit.setup()"""


def render_setup_cell(source: str | None = None) -> str:
    """The setup cell; `source` is its default install source (default: `git+<repository URL>`)."""
    default = source or f"git+{repository_url()}"
    return SETUP_CELL.replace("{source}", default)


def colab_url(name: str) -> str:
    """The Colab address that opens `notebooks/<name>` of the repository's default branch."""
    url = repository_url()
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(\.git)?", url)
    if match is None:
        raise MfkitError(
            f"Colab opens notebooks from GitHub only; the repository URL is {url}.",
            "declare a https://github.com/OWNER/REPO address in pyproject.toml [project.urls].",
        )
    return f"https://colab.research.google.com/github/{match[1]}/{match[2]}/blob/{BRANCH}/notebooks/{name}"


def render_badge(name: str) -> str:
    """The "Open in Colab" badge (markdown) of the notebook file `name`, e.g. `03_full-finetuning.ipynb`."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(Path(name).name)})"


# --- syncing notebooks -------------------------------------------------------------------------------------


def numbered(folder: str | os.PathLike) -> list[Path]:
    """The `NN_slug.ipynb` notebooks of `folder`, in order."""
    return sorted(Path(folder).glob(NOTEBOOK_GLOB))


def _setup_cell(nb: nbformat.NotebookNode, path: Path) -> nbformat.NotebookNode:
    """The notebook's setup cell: the code cell marked `# mfkit setup` (or the older install cell)."""
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code:
        if cell.source.startswith(SETUP_MARKER):
            return cell
    for cell in code:
        if LEGACY_SETUP in cell.source:
            return cell
    raise MfkitError(
        f"{path.name} has no setup cell (a code cell whose first line is {SETUP_MARKER!r}).",
        f"add an empty code cell starting with {SETUP_MARKER!r} after the title; sync fills it in.",
    )


def _with_badge(text: str, badge: str) -> str:
    """`text` (the first markdown cell) with its badge line replaced, or inserted below the title line."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if BADGE_IMAGE in line:
            lines[i] = badge
            return "\n".join(lines)
    after = lines[1:]
    tail = after if after and after[0] == "" else [""] + after if after else []
    return "\n".join([lines[0], "", badge, *tail])


def render_notebook(path: str | os.PathLike, source: str | None = None) -> tuple[str, str]:
    """(the file's current text, its text with the setup cell and the badge brought up to date)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=4)
    cell = _setup_cell(nb, path)
    wanted = render_setup_cell(source)
    if cell.source != wanted:
        cell.source, cell.outputs, cell.execution_count = wanted, [], None
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first is None:
        raise MfkitError(
            f"{path.name} has no markdown cell for its title.", "start the notebook with a title cell."
        )
    first.source = _with_badge(first.source, render_badge(path.name))
    return text, nbformat.writes(nb) + "\n"


def sync(folder: str | os.PathLike, source: str | None = None) -> list[Path]:
    """Rewrite the setup cell and the badge of every numbered notebook in `folder`; return those changed."""
    changed = []
    for path in numbered(folder):
        old, new = render_notebook(path, source)
        if new != old:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def check(folder: str | os.PathLike) -> list[Path]:
    """The numbered notebooks of `folder` whose setup cell or badge is out of date."""
    return [path for path in numbered(folder) if len(set(render_notebook(path))) > 1]


def readme_problems(readme: str, names: Sequence[str]) -> list[str]:
    """What keeps the README's notebook table from matching `names`: each notebook's row (the table line linking
    `notebooks/<name>`) must carry its badge, and no badge may point at a notebook that does not exist."""
    problems = []
    lines = readme.splitlines()
    for name in names:
        rows = [line for line in lines if line.startswith("|") and f"(notebooks/{name})" in line]
        if not rows:
            problems.append(f"no table row links notebooks/{name}")
        elif not any(render_badge(name) in row for row in rows):
            problems.append(f"the row of {name} lacks its badge: {render_badge(name)}")
    linked = set(re.findall(r"colab\.research\.google\.com/github/[^)]*/notebooks/([^)\s]+\.ipynb)", readme))
    problems += [f"a badge points at {name}, which is not a notebook" for name in sorted(linked - set(names))]
    return problems


# --- copies for an installed kit ------------------------------------------------------------------------------


def copy_notebooks(target: str | os.PathLike, force: bool = False) -> list[Path]:
    """Copy the kit's numbered notebooks into `target`; return the files written.

    A file already there and different (perhaps edited) is kept unless `force`: then nothing is copied and the
    error names those files.
    """
    target = Path(target).expanduser().resolve()
    sources = numbered(notebooks_dir())
    if not sources:
        raise MfkitError(
            f"No notebooks found in {notebooks_dir()}.",
            "reinstall the kit: pip install --force-reinstall mfkit",
        )
    changed = [
        s.name
        for s in sources
        if (target / s.name).exists() and not filecmp.cmp(s, target / s.name, shallow=False)
    ]
    if changed and not force:
        raise MfkitError(
            f"{target} already holds different copies of {', '.join(changed)}.",
            "keep your edits by choosing another folder, or pass --force to overwrite them.",
        )
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        dest = target / src.name
        if not dest.exists() or src.name in changed:
            shutil.copyfile(src, dest)
            written.append(dest)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mfkit.notebook_cells sync|check [DIR] [--readme FILE]`; exit 1 when `check` finds a difference."""
    parser = argparse.ArgumentParser(
        prog="python -m mfkit.notebook_cells", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["sync", "check"])
    parser.add_argument(
        "folder", nargs="?", default=None, help="the notebooks folder; default: the kit's notebooks"
    )
    parser.add_argument("--readme", metavar="FILE", help="check: also check this README's notebook table")
    args = parser.parse_args(argv)
    folder = Path(args.folder) if args.folder else notebooks_dir()
    try:
        if args.action == "sync":
            for path in sync(folder):
                print(f"updated {path}")
            return 0
        stale = [f"{p.name}: setup cell or badge out of date" for p in check(folder)]
        if args.readme:
            names = [p.name for p in numbered(folder)]
            stale += [f"{args.readme}: {p}" for p in readme_problems(Path(args.readme).read_text(), names)]
    except MfkitError as exc:
        print(f"mfkit notebook_cells: {exc}", file=sys.stderr)
        return 2
    print("\n".join(stale) or "in sync")
    if stale:
        print(f"fix: python -m mfkit.notebook_cells sync {folder}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
