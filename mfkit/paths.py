"""Where things live: the shipped data and notebooks, the artifacts and runs the chain writes.

Two layouts are supported. In a clone of the repository (the package's parent folder holds `pyproject.toml` and
`notebooks/`, whether the kit is installed editable or not at all) the data and notebooks are the repository's
`data/` and `notebooks/`, and artifacts and runs go to the repository. Installed from a wheel (`pip install`, the
notebooks' setup cell on Colab) the data and notebooks are the package's own `mfkit/_data` and `mfkit/_notebooks`,
found with `importlib.resources`, and artifacts and runs go to the working folder, never into site-packages.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import MfkitError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
ARTIFACTS_ENV = "MFKIT_ARTIFACTS_DIR"
DATA_ENV = "MFKIT_DATA_DIR"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"


def in_clone() -> bool:
    """True when the package is imported from a clone of the repository (editable install or the source tree)."""
    return (REPO_DIR / "pyproject.toml").is_file() and (REPO_DIR / "notebooks").is_dir()


def _bundled(resource: str, repo_folder: str) -> Path:
    """A folder the wheel carries as `mfkit/<resource>`; in a clone, the repository's `<repo_folder>/`."""
    if in_clone():
        return REPO_DIR / repo_folder
    return Path(str(importlib.resources.files(__package__).joinpath(resource)))


def data_dir() -> Path:
    """The shipped data folder: `$MFKIT_DATA_DIR`, else `data/` of the clone, else the installed package's copy."""
    chosen = os.environ.get(DATA_ENV)
    return Path(chosen) if chosen else _bundled("_data", "data")


def notebooks_dir() -> Path:
    """The numbered notebooks the kit ships: `notebooks/` of the clone, else the installed package's copy."""
    return _bundled("_notebooks", "notebooks")


def work_dir() -> Path:
    """Where the chain writes by default: the clone's root, else the current working folder."""
    return REPO_DIR if in_clone() else Path.cwd()


def runs_dir() -> Path:
    """The default parent of `mfkit run` outputs (`runs/<profile>`): `runs/` of the clone or the working folder."""
    return (work_dir() / "runs").resolve()


def chain_notebooks_dir() -> Path:
    """The notebooks `mfkit run` executes by default.

    In a clone, its `notebooks/`; elsewhere the working folder when it holds numbered notebooks (the copies
    `mfkit notebooks DIR` made, which a learner may have edited), else the installed package's copies.
    """
    if not in_clone() and any(Path.cwd().glob(NOTEBOOK_GLOB)):
        return Path.cwd().resolve()
    return notebooks_dir()


def artifacts_location(path: str | os.PathLike | None = None) -> Path:
    """The artifacts folder, not created: `path` if given, else `$MFKIT_ARTIFACTS_DIR`, else `artifacts/` of the
    clone or of the working folder."""
    chosen = path if path is not None else os.environ.get(ARTIFACTS_ENV) or work_dir() / "artifacts"
    return Path(chosen).expanduser().resolve()


def artifacts_dir(path: str | os.PathLike | None = None) -> Path:
    """The artifacts folder (see `artifacts_location`), created if needed."""
    resolved = artifacts_location(path)
    resolved.mkdir(parents=True, exist_ok=True)
    return resolved


def require_artifact(path: str | os.PathLike, made_by: str) -> Path:
    """Return `path` if it exists, else stop with a message naming the notebook that makes it."""
    path = Path(path)
    if not path.exists():
        raise MfkitError(
            f"{path} does not exist yet; notebook {made_by} writes it.",
            f"run notebooks/{made_by}.ipynb first (or `mfkit run --to {made_by[:2]}`), "
            "with the same ARTIFACTS_DIR.",
        )
    return path


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.

    A crash half-way leaves the old `target` (or nothing) in place, never a half-written file that a later
    notebook would mistake for a good one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            _default_permissions(tmp_path, 0o666)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _default_permissions(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private files and folders; give `path` the permissions of any new one."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def _processes() -> Any | None:
    """accelerate's `PartialState` where several processes run this code (`accelerate launch`), else None.

    Read from torchrun's WORLD_SIZE, so a single process (a notebook) never creates accelerate's state here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import PartialState

    return PartialState()


def is_main_process() -> bool:
    """True in the process that writes shared files: the only one, or the main one under `accelerate launch`."""
    state = _processes()
    return state is None or state.is_main_process


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it takes the place of `target` by rename.

    A crash half-way leaves the previous folder (or nothing) in place, never a half-written one that a later
    notebook would load. The previous folder is moved aside first and deleted once the new one is in place.

    Under `accelerate launch`, call it on every process: each writes to its own staging folder, only the main
    process's takes the place of `target`, and every process waits at the end until it has (so that all of them
    can load `target` next). Called on the main process only, it would wait for the others forever.
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    processes = _processes()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    retired: Path | None = None
    try:
        yield staging
        if processes is None or processes.is_main_process:
            _default_permissions(staging, 0o777)
            if target.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
                os.replace(target, retired / target.name)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        if processes is not None:
            processes.wait_for_everyone()
