"""Generate docs/configuration.md and config/gateway.example.toml from ``Settings``.

The settings model is the one source: each field's name gives the variable,
its annotation and constraints the type, its default the default, its
``description`` the meaning and its ``examples`` the commented-out example
of a setting that is unset by default. Run it after changing a setting:

    .venv/bin/python scripts/docgen.py           # rewrite both files
    .venv/bin/python scripts/docgen.py --check   # exit 1 if either is stale

tests/test_docgen.py runs the check in CI. It lives here, not in the gateway
package, because nothing at run time needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from enum import Enum
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway.settings import ENV_PREFIX, Settings, file_settings

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "config" / "gateway.example.toml"
COMMAND = ".venv/bin/python scripts/docgen.py"

# Where each section of the reference begins: a section runs from its field
# to the next one named here, in the model's declaration order, so a setting
# added inside a section needs no change here.
SECTIONS: dict[str, str] = {
    "host": "Listener",
    "upstream_url": "Upstream",
    "max_body_bytes": "Limits on what clients send",
    "redis_url": "Store",
    "unknown_secrets": "Admission",
    "revocation_ttl_seconds": "Revocation",
    "workflows": "Issuer mode",
    "model_api_key": "The model: model tokens, model routes, budgets",
    "admin_token": "Admin API",
    "max_target_bytes": "Client connections: slow or hostile clients, shutdown",
    "log_format": "Observability",
}

REFERENCE_INTRO = """\
# Configuration reference

<!-- Generated from gateway/settings.py by `{command}`; do not edit. -->

Every setting is an environment variable with the `GATEWAY_` prefix.
`GATEWAY_CONFIG_FILE` may name a TOML file of the same settings (lower-case
names at top level, tables for the structured ones; `config/gateway.example.toml`
lists every setting at its default), and the environment wins over the file.
An empty variable means "the default". An unknown `GATEWAY_*` variable or an
invalid value stops start-up with one line naming the variable (exit status 2).

**Secrets from files.** Every secret setting can instead be read from a
file, as Kubernetes and Docker mount secrets:
`GATEWAY_REDIS_URL_FILE=/run/secrets/redis-url`. One trailing newline is
dropped; setting both the variable and its `_FILE` is an error, and so is a
file that cannot be read or is empty. Secrets never appear in the start-up
log (it shows the Redis URL and the egress proxy without credentials). The
secret settings: {file_settings}.

**Kubernetes service links.** Kubernetes gives every pod variables for each
Service in its namespace (`<SERVICE>_PORT=tcp://10.0.0.1:80`,
`<SERVICE>_SERVICE_HOST`, ...); for a Service named `gateway` or `gateway-*`
they start with `GATEWAY_`. The gateway (and its CLI) recognises them by name
and value, ignores them and logs one warning naming them; a misspelt setting
still stops start-up. The manifests in `deploy/` set `enableServiceLinks: false`
anyway.

Tracing is configured by the standard `OTEL_*` variables, not here (see
[Operating](operating.md#traces)).
"""

EXAMPLE_INTRO = """\
# chatkit-gateway settings, every one at its default.
# Generated from gateway/settings.py by `{command}`; do not edit.
#
# Load with GATEWAY_CONFIG_FILE=config/gateway.example.toml. Keys are the
# lower-case setting names (GATEWAY_UPSTREAM_URL -> upstream_url), at top
# level; an unknown key stops start-up. Any GATEWAY_* environment variable
# wins over this file. Settings whose default is "unset" are commented out.
# Keep secrets out of it: set them in the environment, or mount them as files
# and name each with GATEWAY_<NAME>_FILE (for example
# GATEWAY_REDIS_URL_FILE=/run/secrets/chatkit-gateway/redis-url). The secrets:
{secrets}
"""


def variable(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def _is_table(field: FieldInfo) -> bool:
    """Settings that TOML writes as tables, which must follow every plain key."""
    origin = get_origin(field.annotation)
    return origin is dict or (origin is tuple and _model_args(field.annotation))


def _model_args(annotation: Any) -> bool:
    return any(isinstance(arg, type) and issubclass(arg, BaseModel) for arg in get_args(annotation))


def type_name(annotation: Any) -> str:
    """A reader's name for a setting's type."""
    if get_origin(annotation) in (Union, UnionType):
        args = [arg for arg in get_args(annotation) if arg is not NoneType]
        return " or ".join(type_name(arg) for arg in args)
    origin = get_origin(annotation)
    if origin is dict:
        return "JSON object"
    if origin is tuple:
        return "JSON array"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " or ".join(f"`{member.value}`" for member in annotation)
    if annotation is SecretStr:
        return "string (secret)"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def constraints(field: FieldInfo) -> str:
    """The bounds pydantic enforces, as a reader writes them."""
    parts = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            parts.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.MinLen):
            parts.append(f"length >= {item.min_length}")
        elif isinstance(item, annotated_types.MaxLen):
            parts.append(f"length <= {item.max_length}")
    return ", ".join(parts)


def default_of(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


def shown_default(field: FieldInfo) -> str:
    value = default_of(field)
    if value is None or value in ({}, ()):
        return "unset"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    """docs/configuration.md."""
    secret_names = ", ".join(f"`{variable(name)}`" for name in sorted(file_settings()))
    out = [REFERENCE_INTRO.format(command=COMMAND, file_settings=secret_names)]
    for title, names in sections():
        out.append(f"\n## {title}\n\n| variable | type | default | meaning |\n|---|---|---|---|\n")
        for name in names:
            field = Settings.model_fields[name]
            kind = type_name(field.annotation)
            bounds = constraints(field)
            if bounds:
                kind += f", {bounds}"
            if name in file_settings():
                kind += f"; or `{variable(name)}_FILE`"
            out.append(
                f"| `{variable(name)}` | {_cell(kind)} | {_cell(shown_default(field))} "
                f"| {_cell(field.description or '')} |\n"
            )
    return "".join(out)


def sections() -> list[tuple[str, list[str]]]:
    """The model's fields grouped under SECTIONS, in declaration order."""
    grouped: list[tuple[str, list[str]]] = []
    for name in Settings.model_fields:
        if name in SECTIONS or not grouped:
            grouped.append((SECTIONS.get(name, "General"), []))
        grouped[-1][1].append(name)
    return grouped


def toml_value(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything we write
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(
        text, width=86, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
    )


def _example_table(name: str, example: Any) -> list[str]:
    """A structured setting's example as commented-out TOML tables."""
    if isinstance(example, list):
        return [line for item in example for line in _table(name, item, array=True)]
    return _table(name, example, array=False)


def _table(name: str, mapping: dict[str, Any], *, array: bool) -> list[str]:
    """``[name]`` (or ``[[name]]``) with its plain keys, then its sub-tables."""
    plain = {
        key: value
        for key, value in mapping.items()
        if not isinstance(value, dict) and not _is_table_list(value)
    }
    lines: list[str] = []
    if plain or array:
        lines.append(f"# [[{name}]]" if array else f"# [{name}]")
        lines.extend(f"# {key} = {toml_value(value)}" for key, value in plain.items())
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines.extend(_table(f"{name}.{key}", value, array=False))
        elif _is_table_list(value):
            lines.extend(
                line for item in value for line in _table(f"{name}.{key}", item, array=True)
            )
    return lines


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def example_toml() -> str:
    """config/gateway.example.toml."""
    secrets = "\n".join(_comment(", ".join(sorted(file_settings())) + "."))
    out = [EXAMPLE_INTRO.format(command=COMMAND, secrets=secrets)]
    tables: list[str] = []
    for title, names in sections():
        out.append(f"\n# --- {title} " + "-" * max(3, 72 - len(title)) + "\n")
        for name in names:
            field = Settings.model_fields[name]
            if _is_table(field):
                tables.append(name)
                out.append(f"# {name}: tables at the end of this file.\n")
                continue
            out.extend(line + "\n" for line in _comment(field.description or ""))
            value = default_of(field)
            if value is None:
                example = (field.examples or ["..."])[0]
                out.append(f"# {name} = {toml_value(example)}\n")
            else:
                out.append(f"{name} = {toml_value(value)}\n")
    out.append("\n# --- Tables (TOML tables must follow every plain key) " + "-" * 19 + "\n")
    for name in tables:
        field = Settings.model_fields[name]
        out.append("\n")
        out.extend(line + "\n" for line in _comment(field.description or ""))
        for example in field.examples or []:
            out.extend(line + "\n" for line in _example_table(name, example))
    return "".join(out)


def outputs() -> dict[Path, str]:
    return {REFERENCE: reference(), EXAMPLE: example_toml()}


def stale() -> list[Path]:
    """The generated files that differ from what the model generates now."""
    return [
        path
        for path, text in outputs().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    args = parser.parse_args(argv)
    if args.check:
        paths = stale()
        for path in paths:
            print(f"{path.relative_to(ROOT)} is stale: run {COMMAND}", file=sys.stderr)
        return 1 if paths else 0
    for path, text in outputs().items():
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
