"""Where things live: the repository, the shipped data, the artifacts the chain writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MfkitError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
ARTIFACTS_ENV = "MFKIT_ARTIFACTS_DIR"
DATA_ENV = "MFKIT_DATA_DIR"


def data_dir() -> Path:
    """The shipped data folder: `$MFKIT_DATA_DIR`, else `data/` of the repository."""
    return Path(os.environ.get(DATA_ENV, REPO_DIR / "data"))


def notebooks_dir() -> Path:
    """The numbered notebooks of the chain."""
    return REPO_DIR / "notebooks"


def artifacts_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve the artifacts folder: `path` if given, else `$MFKIT_ARTIFACTS_DIR`, else `artifacts/` of the repo."""
    chosen = path if path is not None else os.environ.get(ARTIFACTS_ENV) or REPO_DIR / "artifacts"
    resolved = Path(chosen).expanduser().resolve()
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


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it takes the place of `target` by rename.

    A crash half-way leaves the previous folder (or nothing) in place, never a half-written one that a later
    notebook would load. The previous folder is moved aside first and deleted once the new one is in place.
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    retired: Path | None = None
    try:
        yield staging
        _default_permissions(staging, 0o777)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
