"""Plain HTTP checks of a target, outside the measured runs."""

from __future__ import annotations

import http.client
from collections.abc import Callable


def http_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


def answers(port: int, path: str = "/healthz") -> Callable[[], bool]:
    def check() -> bool:
        try:
            return http_request(port, "GET", path)[0] < 500
        except OSError:
            return False

    return check
