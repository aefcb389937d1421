"""nginx as a reference proxy (proxy_pass with upstream keepalive), and as the
constant upstream behind every proxy measured."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def nginx_conf(
    binary: str, workdir: Path, port: int, upstream_port: int, *, constant: bytes | None = None
) -> str:
    """``constant``: answer ``?bench=1`` requests with this body, proxy the rest."""
    # Every temp path nginx was built with must point somewhere writable.
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    temp_paths = "".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if kind == "client_body" or kind == "proxy" or f"--http-{kind}-temp-path" in built
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    pid = "nginx-backend.pid" if constant is not None else "nginx.pid"
    return f"""\
{user}worker_processes 1;
pid {workdir}/{pid};
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/json;
{temp_paths}    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000000;
        location / {{
{_constant(constant)}            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def _constant(body: bytes | None) -> str:
    if body is None:
        return ""
    # nginx discards the request body itself before answering.
    text = body.decode().replace("\\", "\\\\").replace("'", "\\'")
    return f"""            if ($arg_bench = "1") {{
                return 200 '{text}';
            }}
"""
