"""The pinned dependency sets in constraints/ agree with pyproject.toml.

scripts/lock writes them; these tests catch a floor raised (or a dependency
added) in pyproject.toml without re-running it, which would leave CI's
lowest-versions run testing something other than the declared floors.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.harness import REPO_ROOT

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
OWN_NAME = canonicalize_name(PROJECT["name"])
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", re.MULTILINE)


def pins(name: str) -> dict[str, str]:
    text = (REPO_ROOT / "constraints" / name).read_text()
    return {canonicalize_name(n): version for n, version in PIN.findall(text)}


def requirements(*extras: str) -> list[Requirement]:
    found = [Requirement(line) for line in PROJECT["dependencies"]]
    for extra in extras:
        found += [Requirement(line) for line in PROJECT["optional-dependencies"][extra]]
    return [r for r in found if canonicalize_name(r.name) != OWN_NAME]


def floor(requirement: Requirement) -> str:
    lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    assert len(lower) == 1, f"{requirement} must declare exactly one >= floor"
    return lower[0]


@pytest.mark.parametrize(
    "requirement", requirements("test", "otel"), ids=lambda r: canonicalize_name(r.name)
)
def test_lowest_set_pins_every_direct_dependency_at_its_floor(requirement: Requirement) -> None:
    pinned = pins("lowest.txt")[canonicalize_name(requirement.name)]
    assert Version(pinned) == Version(floor(requirement))


@pytest.mark.parametrize(
    ("lock", "extras"),
    [
        ("runtime.txt", ()),
        ("dev.txt", ("dev", "test", "otel")),
    ],
)
def test_locks_satisfy_the_declared_ranges_and_carry_hashes(
    lock: str, extras: tuple[str, ...]
) -> None:
    pinned = pins(lock)
    for requirement in requirements(*extras):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is missing from {lock}"
        assert requirement.specifier.contains(version, prereleases=True), (lock, requirement)
    text = (REPO_ROOT / "constraints" / lock).read_text()
    # pip installs a file in hash-checking mode only if every pin has a hash.
    hashed = re.findall(r"^[A-Za-z0-9_.\-]+==.*\\\n\s+--hash=sha256:", text, re.MULTILINE)
    assert len(hashed) == len(pinned)


def test_the_image_and_scripts_install_from_the_locks() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile
    assert "constraints/runtime.txt" in dockerfile
    assert "!constraints/runtime.txt" in (REPO_ROOT / ".dockerignore").read_text()
    install = (REPO_ROOT / "scripts" / "install").read_text()
    for lock in ("constraints/runtime.txt", "constraints/dev.txt", "constraints/lowest.txt"):
        assert lock in install


def test_lowest_run_leaves_out_the_modules_needing_dev_only_packages() -> None:
    # Those packages are not in constraints/lowest.txt, so scripts/test-lowest
    # skips the modules that import them, found with this grep pattern.
    script = (REPO_ROOT / "scripts" / "test-lowest").read_text()
    [pattern] = re.findall(r"^DEV_ONLY_IMPORTS='(.+)'$", script, re.MULTILINE)
    found = subprocess.run(
        ["grep", "-lE", pattern, *sorted(str(p) for p in (REPO_ROOT / "tests").glob("test_*.py"))],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    names = {Path(path).name for path in found}
    assert {"test_example.py", "test_browser_cors.py", "test_issuer_chatkit.py"} <= names
    assert "test_proxy.py" not in names  # the gateway's own tests all run
    lowest = pins("lowest.txt")
    assert "openai-chatkit" not in lowest
    assert "playwright" not in lowest


def test_runtime_lock_pins_the_same_versions_as_the_dev_lock() -> None:
    # scripts/serve installs the runtime set into the venv scripts/test built.
    runtime, dev = pins("runtime.txt"), pins("dev.txt")
    assert {name: dev.get(name) for name in runtime} == runtime
