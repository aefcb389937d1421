"""Plain HTTP checks of a target, outside the measured runs."""

from __future__ import annotations

from collections.abc import Callable

from tests.processes import http_request

__all__ = ["answers", "http_request"]


def answers(port: int, path: str = "/healthz") -> Callable[[], bool]:
    def check() -> bool:
        try:
            return http_request(port, "GET", path)[0] < 500
        except OSError:
            return False

    return check
