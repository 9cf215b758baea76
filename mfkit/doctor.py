"""`mfkit doctor`: is this environment ready for the notebooks? Each missing piece comes with the command that fixes it.

Checked: Python and package versions (the kit's declared requirements, read from its metadata), the installed
versions that differ from those CI tested (`mfkit/constraints.txt`), the device and precision `mfkit.env` picks, the Jupyter kernel `mfkit run` starts, the embedded model packages, the shipped data
and notebooks, and the optional packages of the kit's extras. Exit code 0 unless a core piece is missing (1): the
Python version, a core dependency, the data, the notebooks or the kernel.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

from .bootstrap import DISTRIBUTION, EMBEDDED, installed_requirements, project_table
from .install import CONSTRAINTS, LATEST_ENV, drift, installed_version, latest_requested, pins
from .paths import NOTEBOOK_GLOB, artifacts_location, in_clone, notebooks_dir, runs_dir

KERNEL_NAME = "python3"  # the kernel `mfkit run` starts (mfkit.runner.KERNEL_NAME)


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it is fine, and the fix when it is not."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    core: bool = False
    flag: str = "absent"  # the mark of a failed optional check

    def line(self) -> str:
        mark = "ok" if self.ok else ("MISSING" if self.core else self.flag)
        text = f"{mark:<7}  {self.name:<22} {self.detail}"
        return text + (f"\n         fix: {self.fix}" if not self.ok and self.fix else "")


def _pip(requirement: str) -> str:
    """The command that installs `requirement` into this interpreter."""
    return f'{sys.executable} -m pip install "{requirement}"'


def requirements() -> tuple[list[str], dict[str, list[str]]]:
    """(core requirements, {extra: requirements}) of the kit: pyproject.toml in a clone, else the installed metadata."""
    project = project_table()
    if project is not None:
        return list(project.get("dependencies", [])), dict(project.get("optional-dependencies", {}))
    return installed_requirements()


def check_requirement(text: str, core: bool, why: str) -> Check:
    """Whether the requirement `text` (e.g. `torch>=2.2`) is installed in a version it accepts."""
    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        return Check(text, False, "unreadable requirement", core=core)
    version = installed_version(requirement.name)
    if version is None:
        return Check(requirement.name, False, f"not installed ({why})", _pip(text), core)
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return Check(
            requirement.name,
            False,
            f"{version} installed, {why} needs {requirement.specifier}",
            _pip(text),
            core,
        )
    return Check(requirement.name, True, version, core=core)


def requires_python() -> str:
    """The kit's `requires-python` specifier (e.g. `>=3.10`)."""
    project = project_table()
    if project is not None:
        return project.get("requires-python", "")
    return importlib.metadata.metadata(DISTRIBUTION).get("Requires-Python", "")


def check_python() -> Check:
    """This interpreter against the kit's `requires-python`."""
    version = ".".join(map(str, sys.version_info[:3]))
    wanted = SpecifierSet(requires_python())
    return Check(
        "python", wanted.contains(version), f"{version} ({sys.executable})", f"use Python {wanted}", core=True
    )


def check_tested() -> list[Check]:
    """One line per installed package whose version is not the one CI tested (`mfkit/constraints.txt`), or one
    line saying all are; the fix installs the tested version, keeping torch."""
    rows = drift()
    if not rows:
        installed = sum(installed_version(name) is not None for name in pins())
        return [
            Check(
                "tested versions",
                True,
                f"all {installed} installed packages CI pins are at their tested versions",
            )
        ]
    why = f"; {LATEST_ENV}=1 asked for the newest" if latest_requested() else ""
    return [
        Check(
            name,
            False,
            f"{have} installed, CI tested {tested} (mfkit/{CONSTRAINTS.name}{why})",
            f'{sys.executable} -m mfkit.install "{name}=={tested}"',
            flag="differs",
        )
        for name, have, tested in rows
    ]


def check_device() -> Check:
    """The device and mixed-precision mode `mfkit.setup()` picks (fp32 'no' on CPU)."""
    try:
        import torch

        from .env import pick_device, pick_precision
    except ImportError as exc:
        return Check("device", False, f"cannot import torch ({exc})", _pip("torch"), core=True)
    device = pick_device()
    name = f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""
    return Check(
        "device", True, f"{device}{name}, precision {pick_precision(device)}, torch {torch.__version__}"
    )


def check_kernel() -> Check:
    """A Jupyter kernel named python3 that `mfkit run` (papermill) can start."""
    fix = f"{sys.executable} -m ipykernel install --sys-prefix --name {KERNEL_NAME}"
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return Check(
            "jupyter kernel", False, "jupyter_client is not installed", _pip("jupyter_client"), core=True
        )
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        return Check("jupyter kernel", False, f"no kernel named {KERNEL_NAME}", fix, core=True)
    return Check("jupyter kernel", True, f"{KERNEL_NAME}: {spec.argv[0]} ({spec.resource_dir})")


def check_embedded() -> list[Check]:
    """The embedded model packages `mfkit.bootstrap` installs."""
    fix = f"{sys.executable} -m mfkit.bootstrap"
    return [Check(p.module, importlib.util.find_spec(p.module) is not None, p.why, fix) for p in EMBEDDED]


def check_shipped() -> list[Check]:
    """The shipped datasets and the numbered notebooks."""
    from .data import SHIPPED, shipped_path

    reinstall = (
        "reinstall the kit (pip install --force-reinstall mfkit) or, in a clone, restore data/ with git"
    )
    checks = []
    for name in SHIPPED:
        path = shipped_path(name)
        checks.append(Check(f"data: {name}", path.is_file(), str(path), reinstall, core=True))
    found = sorted(notebooks_dir().glob(NOTEBOOK_GLOB))
    checks.append(Check("notebooks", bool(found), f"{len(found)} in {notebooks_dir()}", reinstall, core=True))
    return checks


def check_places() -> Check:
    """Where artifacts and runs go by default (the clone, or the working folder of an installed kit)."""
    layout = "a clone of the repository" if in_clone() else "installed; outputs go to the working folder"
    return Check("layout", True, f"{layout}: artifacts {artifacts_location()}, runs {runs_dir()}")


def run_checks() -> list[Check]:
    """Every check, in report order."""
    core, extras = requirements()
    checks = [check_python()]
    checks += [check_requirement(r, True, "core") for r in core]
    checks += check_tested()
    checks += [check_device(), check_kernel(), check_places(), *check_shipped(), *check_embedded()]
    embedded = {Requirement(p.requirement).name for p in EMBEDDED}
    for extra, items in extras.items():
        checks += [
            check_requirement(r, False, f"extra [{extra}]")
            for r in items
            if Requirement(r).name not in embedded
        ]
    return checks


def report(checks: Iterable[Check]) -> str:
    """The report: one line per check, the fix under each one that failed."""
    return "\n".join(check.line() for check in checks)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; return 1 when a core piece is missing, else 0."""
    checks = run_checks()
    print(report(checks))
    broken = [c.name for c in checks if c.core and not c.ok]
    if broken:
        print(f"\nmfkit doctor: core pieces missing: {', '.join(broken)}; run the fixes above.")
        return 1
    print(
        "\nmfkit doctor: the core is in place"
        + ("" if all(c.ok for c in checks) else "; optional pieces above")
    )
    return 0
