"""pip with the versions CI tested (`mfkit/constraints.txt`, shipped in the wheel), never replacing the installed torch.

Standard library only, and no import of the rest of the kit: the notebooks' setup cell runs this file by its path
right after installing the kit alone (`pip install --no-deps`), when the kit's dependencies are not there yet.

    python PATH/TO/mfkit/install.py PIP_ARGS...    # pip install PIP_ARGS with the tested versions (setup cell)
    python -m mfkit.install PIP_ARGS...            # the same once the kit is importable
    python -m mfkit.install --drift                # installed versions that differ from the tested ones

The constraints pin every package CI installs. Their torch line is replaced by the torch already installed (a
runtime's CUDA build, the one `MFKIT_TORCH` chose), so no requirement can replace it, and the lines of the Jupyter
kernel's own packages are dropped where those are installed (the kernel running this, e.g. Colab's, keeps them as
long as they meet the kit's lower bounds). With `MFKIT_LATEST=1` only the torch pin is kept: pip takes the newest
releases the kit's lower bounds allow.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

CONSTRAINTS = Path(__file__).with_name("constraints.txt")
LATEST_ENV = "MFKIT_LATEST"
# `uv` makes the installs of `.ci/setup` minutes shorter (same constraints, same versions); the notebooks' setup
# cell keeps pip, which every runtime has.
INSTALLER_ENV = "MFKIT_INSTALLER"
TORCH_LINE = re.compile(r"\s*torch\s*([=<>!~;\[]|$)")
# What a running Jupyter kernel is made of: where installed, kept at its version (its pins are dropped).
KERNEL_PACKAGES = ("ipykernel", "ipython", "jupyter_client")
PIN = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)\s*(#.*)?$")


def latest_requested() -> bool:
    """Whether `$MFKIT_LATEST` asks for the newest releases (any value but empty or 0)."""
    return os.environ.get(LATEST_ENV, "").strip() not in ("", "0")


def tested_constraints() -> Path | None:
    """The shipped constraints file, or None when `$MFKIT_LATEST` asks for the newest releases."""
    return None if latest_requested() else CONSTRAINTS


def installed_version(distribution: str) -> str | None:
    """The installed version of `distribution`, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def constraints_keeping_the_runtime(base: str | os.PathLike | None = None) -> str:
    """pip constraints: the lines of `base` (if given) minus its torch pins and the pins of the installed kernel
    packages, plus a pin to the installed torch."""
    lines = Path(base).read_text().splitlines() if base is not None else []
    kernel = {name for name in KERNEL_PACKAGES if installed_version(name) is not None}
    kept = [line for line in lines if not TORCH_LINE.match(line) and _pinned_name(line) not in kernel]
    torch = installed_version("torch")
    if torch is not None:
        kept.append(f"torch=={torch}")
    return "\n".join(kept) + "\n"


def run_pip(args: Sequence[str], constraints: str | os.PathLike | None = None) -> int:
    """`pip install --quiet ARGS` in this interpreter under `constraints` with the installed torch pinned; its exit code."""
    with tempfile.TemporaryDirectory(prefix="mfkit-pip-") as folder:
        pinned = Path(folder) / "constraints.txt"
        pinned.write_text(constraints_keeping_the_runtime(constraints))
        return subprocess.run([*installer(), "--quiet", "-c", str(pinned), *args]).returncode


def installer() -> list[str]:
    """The install command for this interpreter: pip, or uv's pip interface where `$MFKIT_INSTALLER` is `uv`."""
    choice = os.environ.get(INSTALLER_ENV, "pip")
    if choice == "uv":
        return [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable]
    if choice != "pip":
        raise SystemExit(f"{INSTALLER_ENV}={choice!r}: use pip (the default) or uv.")
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]


def _pinned_name(line: str) -> str | None:
    """The distribution a `name==version` line pins, or None."""
    match = PIN.match(line)
    return match[1] if match else None


def pins(path: str | os.PathLike = CONSTRAINTS) -> dict[str, str]:
    """{distribution: version} of the `name==version` lines of a constraints file."""
    found = (PIN.match(line) for line in Path(path).read_text().splitlines())
    return {match[1]: match[2] for match in found if match}


def same_release(installed: str, tested: str) -> bool:
    """Whether an installed version is the tested one, ignoring a local build label (`2.13.0+cpu` is `2.13.0`)."""
    # packaging is a dependency of the kit, not of this file's first use: imported only here
    from packaging.version import InvalidVersion, Version

    try:
        return Version(installed).public == Version(tested).public
    except InvalidVersion:
        return installed == tested


def drift(path: str | os.PathLike = CONSTRAINTS) -> list[tuple[str, str, str]]:
    """(distribution, installed, tested) for each installed package whose version is not the tested one."""
    installed = ((name, installed_version(name), tested) for name, tested in pins(path).items())
    return [
        (name, have, tested) for name, have, tested in installed if have and not same_release(have, tested)
    ]


def describe_drift(path: str | os.PathLike = CONSTRAINTS) -> str:
    """One line per package that differs from the tested version, or a line saying none does."""
    rows = drift(path)
    if not rows:
        return "every installed package CI pins is at its tested version"
    return "\n".join(f"{name} {have} (tested: {tested})" for name, have, tested in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """`install.py PIP_ARGS...` (pip install them, tested versions unless $MFKIT_LATEST) or `install.py --drift`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in ([], ["-h"], ["--help"]):
        print(__doc__)
        return 0 if args else 2
    if args == ["--drift"]:
        print(describe_drift())
        return 0
    return run_pip(args, tested_constraints())


if __name__ == "__main__":
    sys.exit(main())
