"""What a bare GPU host lacks for bench/gpu_check.py: the wheels to bring, which of them to install, a simulation.

A bare H200 host has Python 3.12 with torch, timm, opencv and scipy in its image, and none of
segmentation-models-pytorch, rasterio, albumentations, pandas, mlflow, optuna or xgboost. The check needs
the first four (and what they require that the host's packages do not), not the last three:

- ``python bench/gpu_wheels.py pins``: ``name==version`` (this venv's versions) of each wheel to bring:
  the requirement closure of CHECK_DISTRIBUTIONS for CPython 3.12 on Linux, less what HOST_DISTRIBUTIONS
  require (``bench/gpu_check.sh prepare`` downloads them, 54 MiB).
- ``python bench/gpu_wheels.py missing DIR`` (on the host, before installing): the wheels of DIR to
  install there: those whose distribution it lacks, and those it has older than the others require.
- ``python bench/gpu_wheels.py bare-site DIR [--host-only]``: DIR of links to only what such a host has
  (and the wheels' packages): ``python -S`` with DIR on PYTHONPATH imports as that host would, which the
  tests use to run the dry run against exactly these packages.

Only the standard library (and ``packaging``, which pip carries) is imported: this runs before anything
is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

# The host image: torch, timm (and so torchvision, huggingface-hub, safetensors, pyyaml, tqdm, pillow),
# opencv and scipy. The check needs these on top, with their requirements that the host's lack.
HOST_DISTRIBUTIONS = ("torch", "torchvision", "timm", "numpy", "scipy", "opencv-python-headless")
# click: rasterio imports it, and a host's huggingface-hub may not need it; typing-extensions: pydantic wants
# a newer one than an older host's torch (installed only where the host's is older, see missing_wheels).
CHECK_DISTRIBUTIONS = (
    "segmentation-models-pytorch", "rasterio", "albumentations", "pandas", "click", "typing-extensions",
)  # fmt: skip
TARGET_ENVIRONMENT = {
    "python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "extra": "",
}  # fmt: skip


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names: tuple[str, ...] | set[str]) -> set[str]:
    """The installed distributions ``names`` need (themselves included), following requirements for Python 3.12."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    stack = [_canonical(n) for n in names]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            print(f"warning: {name} is required but not installed here; not brought", file=sys.stderr)
            continue
        seen.add(name)
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(TARGET_ENVIRONMENT):
                stack.append(_canonical(requirement.name))
    return seen


def host_distributions() -> set[str]:
    """What a bare host is taken to have: HOST_DISTRIBUTIONS and their requirements, less CHECK_DISTRIBUTIONS."""
    return requirement_closure(HOST_DISTRIBUTIONS) - {_canonical(n) for n in CHECK_DISTRIBUTIONS}


def wheel_pins() -> list[str]:
    """``name==version`` (this venv's versions) of every wheel the check needs that a bare host lacks."""
    brought = requirement_closure(CHECK_DISTRIBUTIONS) - host_distributions()
    return sorted(f"{name}=={metadata.version(name)}" for name in brought)


def _wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel file's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def missing_wheels(folder: Path) -> list[Path]:
    """The wheels in ``folder`` to install here: those this Python lacks, and those it has at a version the
    others require newer (e.g. an older host's typing-extensions under pydantic); a warning for each such
    version with no wheel to replace it.
    """
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare host still has pip's copy
        from pip._vendor.packaging.requirements import Requirement

    wheels = {_canonical(w.name.split("-")[0]): w for w in sorted(Path(folder).glob("*.whl"))}

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    chosen = {name for name in wheels if installed(name) is None}
    pending = list(chosen)
    while pending:
        for line in _wheel_requirements(wheels[pending.pop()]):
            requirement = Requirement(line)
            name, version = _canonical(requirement.name), installed(requirement.name)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if name in chosen or version is None or requirement.specifier.contains(version, prereleases=True):
                continue
            if name in wheels:
                chosen.add(name)
                pending.append(name)
            else:
                print(f"warning: this Python's {name} {version} does not satisfy {line}", file=sys.stderr)
    return [wheels[name] for name in sorted(chosen)]


def bare_host_site(dest: Path, with_wheels: bool = True) -> Path:
    """A folder of links to only a bare host's distributions (and the wheels'): ``python -S`` with it on
    PYTHONPATH imports what such a host would (the tests' dry run)."""
    allowed = host_distributions() | ({pin.split("==")[0] for pin in wheel_pins()} if with_wheels else set())
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(allowed):
        dist = metadata.distribution(name)
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}
        for top in sorted(tops):
            link, target = dest / top, Path(str(dist.locate_file(top))).resolve()
            if target.exists() and not (link.exists() or link.is_symlink()):
                link.symlink_to(target)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pins", help="the wheels a bare host lacks, name==version")
    missing = commands.add_parser("missing", help="the wheels of DIR this Python should install")
    missing.add_argument("folder", type=Path)
    site = commands.add_parser("bare-site", help="link a bare host's packages (and the wheels') into DIR")
    site.add_argument("folder", type=Path)
    site.add_argument("--host-only", action="store_true", help="without the wheels' packages")
    opts = parser.parse_args(argv)
    if opts.command == "pins":
        print("\n".join(wheel_pins()))
    elif opts.command == "missing":
        print("\n".join(str(path) for path in missing_wheels(opts.folder)))
    else:
        print(bare_host_site(opts.folder, with_wheels=not opts.host_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
