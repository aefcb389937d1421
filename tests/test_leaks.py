"""A socket or connection a test leaves open fails the suite.

A leak found by the garbage collector surfaces wherever the collector runs,
which is why it once ended up downgraded to a warning. tests/conftest.py
collects after each module, so it fails the module that leaked, and
``filterwarnings = error`` makes the finaliser's ResourceWarning an error.
Shown here on a throwaway test module run with the suite's own configuration.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.processes import REPO_ROOT

LEAKY = """
import socket


class Holder:
    pass


def test_leaves_a_socket_in_a_cycle() -> None:
    # A cycle: only the collector frees it, after this test has passed.
    holder = Holder()
    holder.itself = holder
    holder.sock = socket.socket()


def test_an_innocent_test_after_it() -> None:
    pass
"""


def _run(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    module = tmp_path / "test_throwaway.py"
    module.write_text(textwrap.dedent(source))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-c",
            str(REPO_ROOT / "pyproject.toml"),
            "--rootdir",
            str(REPO_ROOT),
            # The suite's conftest, as a plugin: the throwaway module is not under tests/.
            "-p",
            "tests.conftest",
            str(module),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_socket_left_open_fails_the_module_that_leaked_it(tmp_path: Path) -> None:
    done = _run(tmp_path, LEAKY)
    # Failed: in the module's last teardown, or in a test of the module if
    # the collector happened to run there first.
    assert done.returncode == 1, done.stdout
    assert "Exception ignored in: <socket.socket" in done.stdout


def test_the_same_module_without_the_leak_passes(tmp_path: Path) -> None:
    done = _run(tmp_path, LEAKY.replace("holder.sock = socket.socket()", "holder.sock = None"))
    assert done.returncode == 0, done.stdout
    assert "2 passed" in done.stdout
