"""Child processes on free local ports: what the tests and the benchmarks share.

Nothing here imports the gateway, so ``tests/harness.py`` (which re-exports
these names) and the ``bench`` package start, wait for and stop their
processes the same way: a free port, a log file rather than a pipe (a chatty
child can never block on a full pipe), a poll for readiness with a deadline,
and SIGTERM then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.01  # readiness poll interval


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_tool(name: str) -> str | None:
    """A binary on PATH, or in /usr/sbin (Debian's nginx), which root's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: Callable[[], str],
    interval: float = POLL_SECONDS,
) -> None:
    """Poll ``ready`` until it holds; TimeoutError naming ``what()`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what()}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen[bytes], *, timeout: float, group: bool = False) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps the process.

    With ``group`` the SIGKILL goes to the process group, for a child started
    in its own session whose workers (uvicorn, nginx) must go with it.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    return proc.wait()


def gateway_env(
    upstream_url: str,
    *,
    port: int,
    redis_url: str | None = None,
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The gateway's environment: ``base`` without any ``GATEWAY_*``, plus ours.

    Stale ``GATEWAY_*`` variables from the developer's shell would otherwise
    change what a test exercises or a benchmark measures.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items()}
    env = {k: v for k, v in env.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"  # so the log shows lines as they happen
    env["GATEWAY_HOST"] = "127.0.0.1"
    env["GATEWAY_PORT"] = str(port)
    env["GATEWAY_UPSTREAM_URL"] = upstream_url
    if redis_url is not None:
        env["GATEWAY_REDIS_URL"] = redis_url
    env.update(extra or {})
    return env


def pinned(cpus: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run on the given CPUs (taskset execs it: the pid stays the command's)."""
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


class Service:
    """A long-running child in its own session, its output in ``workdir/<name>.log``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        workdir: Path,
        cpus: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name.replace(' ', '-')}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            pinned(cpus, argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=REPO_ROOT,
            start_new_session=True,
        )

    def wait_ready(self, ready: Callable[[], bool], *, timeout: float = 30.0) -> None:
        """Poll ``ready``; RuntimeError with the log's tail if the child exits first."""

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            return ready()

        wait_until(up, timeout=timeout, what=lambda: f"{self.name}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        """This process and its descendants (uvicorn and nginx workers)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def stop(self, grace: float = 15.0) -> None:
        terminate(self.proc, timeout=grace, group=True)
        self._log.close()
