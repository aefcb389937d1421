#!/usr/bin/env python3
"""Render a kustomization in deploy/kubernetes without kubectl.

    python deploy/render.py deploy/kubernetes/overlays/shared > shared.yaml

The manifests use the part of kustomize that is plain composition (a
``resources:`` list of files and directories), so the result is the same
documents that ``kubectl kustomize`` prints; CI compares the two when kubectl
is installed. Anything beyond that subset is refused rather than ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

_SUPPORTED = {"apiVersion", "kind", "resources"}


def render(directory: Path) -> list[dict[str, Any]]:
    """Every document the kustomization in ``directory`` produces."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - _SUPPORTED
    if unsupported:
        raise ValueError(f"{directory}: kustomize fields not rendered here: {sorted(unsupported)}")
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            documents += render(path)
        else:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: render.py DIRECTORY-WITH-KUSTOMIZATION", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(Path(argv[1])), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
