"""Install the carried wheels into a target folder, keeping the machine's own copy of a package where it will do.

    python benchmarks/gpu/install_wheels.py .whl /tmp/gpu_suite/site-packages      # then PYTHONPATH=<target>

Run it with the machine's Python and *without* the target on ``PYTHONPATH``, so that it sees only what the machine
has. For each wheel in the folder:

* the machine has no copy of the distribution, or its copy does not satisfy what the carried wheels require of it
  (e.g. datasets 5.2 needs pyarrow >= 24): the wheel is installed into the target;
* the machine's copy satisfies every requirement: it is kept (its binary build matches the machine's Python and
  numpy, which a carried binary wheel may not).

Then every requirement of the installed wheels is checked against what Python will see (target first), and each
unmet one is printed, naming both sides, so that a later import error is explained in the log. The target folder's
path should contain ``site-packages``: dill (used by datasets for fingerprints) pickles classes of modules outside
such folders by value, which fails for pyarrow's types. Exit status: 0 when every chosen wheel installed, else 1.
"""

from __future__ import annotations

import argparse
import email.parser
import glob
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field

from packaging.requirements import Requirement
from packaging.version import Version


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name: ``Pillow`` → ``pillow``, ``python_dateutil`` → ``python-dateutil``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Wheel:
    """One carried wheel: its file, distribution name and version, and its unconditional requirements."""

    path: str
    name: str
    version: Version
    requires: list[Requirement] = field(default_factory=list)


def read_wheel(path: str) -> Wheel:
    """Name, version and requirements (those that apply to this Python, extras excluded) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as archive:
        metadata_name = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        if metadata_name is None:
            raise ValueError(f"{path}: not a wheel (no .dist-info/METADATA)")
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    requires = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            requires.append(requirement)
    return Wheel(path, normalize(metadata["Name"]), Version(metadata["Version"]), requires)


def installed_version(name: str) -> Version | None:
    """The version of distribution ``name`` that Python currently sees, or None."""
    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(wheels: list[Wheel], installed: dict[str, Version | None]) -> list[tuple[Wheel, bool, str]]:
    """Decide for each wheel whether to install it; returns (wheel, install?, reason) in the wheels' order.

    Args:
        wheels: the carried wheels.
        installed: the machine's version of each wheel's distribution (None where absent).
    """
    decisions = []
    for wheel in wheels:
        have = installed.get(wheel.name)
        if have is None:
            decisions.append((wheel, True, "not on the machine"))
            continue
        unmet = [
            f"{other.name} needs {req}"
            for other in wheels
            for req in other.requires
            if normalize(req.name) == wheel.name and not req.specifier.contains(have, prereleases=True)
        ]
        if unmet:
            decisions.append((wheel, True, f"the machine's {have} does not do: {'; '.join(unmet)}"))
        else:
            decisions.append((wheel, False, f"the machine's {have} satisfies the carried wheels"))
    return decisions


def unmet_requirements(wheels: list[Wheel]) -> list[str]:
    """Requirements of ``wheels`` that the distributions Python now sees do not meet, as readable lines."""
    problems = []
    for wheel in wheels:
        for req in wheel.requires:
            have = installed_version(req.name)
            if have is None:
                problems.append(f"{wheel.name} {wheel.version} needs {req}: not installed")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{wheel.name} {wheel.version} needs {req}: found {have}")
    return problems


def extract_wheel(path: str, target: str) -> None:
    """Install a wheel without pip: unpack it into ``target`` (the code of ``*.data/purelib`` and ``*.data/platlib``
    moved to the top, other ``*.data`` parts such as scripts left out), keeping the ``.dist-info`` so that
    ``importlib.metadata`` finds the version."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            name = member.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            if name.endswith("/") or not name or ".." in name.split("/"):
                continue
            destination = os.path.join(target, name)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with archive.open(member) as source, open(destination, "wb") as output:
                output.write(source.read())


def pip_install(paths: list[str], target: str) -> list[str]:
    """Install wheel files into ``target`` with pip (no index, no dependencies); returns the files that failed.

    Without pip on the machine, the wheels are unpacked instead (``extract_wheel``)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        print("pip is not available: unpacking the wheels instead")
        for path in paths:
            extract_wheel(path, target)
        return []
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", target]
    if subprocess.run(command + paths).returncode == 0:
        return []
    # One at a time, to name the wheel that pip refused (e.g. built for another Python).
    return [path for path in paths if subprocess.run(command + [path]).returncode != 0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel_dir", help="folder of carried .whl files")
    parser.add_argument("target", help="folder to install into (put it first on PYTHONPATH afterwards)")
    args = parser.parse_args(argv)

    paths = sorted(glob.glob(os.path.join(args.wheel_dir, "*.whl")))
    if not paths:
        print(f"no wheels in {args.wheel_dir}: using the machine's packages only")
        return 0
    wheels = [read_wheel(path) for path in paths]
    decisions = plan(wheels, {wheel.name: installed_version(wheel.name) for wheel in wheels})
    for wheel, install, reason in decisions:
        print(f"{'install' if install else 'keep   '} {wheel.name} {wheel.version}: {reason}")
    chosen = [wheel for wheel, install, _ in decisions if install]
    if not chosen:
        return 0

    os.makedirs(args.target, exist_ok=True)
    failed = pip_install([wheel.path for wheel in chosen], args.target)
    for path in failed:
        print(f"error: pip could not install {os.path.basename(path)} (see pip's message above)")

    sys.path.insert(0, os.path.abspath(args.target))
    importlib.invalidate_caches()
    for problem in unmet_requirements(chosen):
        print(f"warning: {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
