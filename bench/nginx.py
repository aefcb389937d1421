"""nginx as a reference proxy: proxy_pass with upstream keepalive."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def nginx_conf(binary: str, workdir: Path, port: int, upstream_port: int) -> str:
    # Every temp path nginx was built with must point somewhere writable.
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    temp_paths = "".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if kind == "client_body" or kind == "proxy" or f"--http-{kind}-temp-path" in built
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""\
{user}worker_processes 1;
pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000000;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
