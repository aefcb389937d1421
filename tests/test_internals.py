"""The dependency internals the gateway relies on: all listed, all checked at start-up.

gateway/internals.py lists every non-public name of uvicorn and redis-py the
gateway uses. The walk below reads gateway/'s source and finds the uses
itself, so a new one that is not listed fails here, whoever adds it:

- in a class that subclasses a uvicorn, redis-py or aiohttp class, every
  method it overrides and every inherited attribute it reads or sets through
  ``self`` or ``super()``;
- anywhere, an attribute that the listed classes (or their instances) have
  and that the gateway does not define itself: ``cycle.more_body``,
  ``pool.connection_kwargs``;
- anywhere, a private attribute (``x._name``) of an object that is not the
  gateway's own.

What the walk cannot see: a name shared by a listed class and the gateway's
own code (``close``, ``host``) on an object of the listed class. Those uses
are listed by hand.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway import internals
from tests.processes import free_port, gateway_env

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
FOREIGN = ("uvicorn", "redis", "aiohttp")

#: Documented API reached through a subclass (the walk cannot tell it apart).
PUBLIC: dict[str, tuple[str, ...]] = {
    # redis-py's client API (its docs: closing a client, its connection pool).
    "redis.asyncio.client:Redis": ("aclose", "connection_pool"),
    # uvicorn's documented programmatic use: uvicorn.Config(app, **options).
    "uvicorn.config:Config": ("__init__",),
}
#: Documented API of the listed classes the gateway calls on their instances.
PUBLIC_CALLS = frozenset(
    {
        # redis-py: a client's commands and cluster API, a pub/sub's methods.
        "execute_command",
        "pipeline",
        "get_nodes",
        "get_primaries",
        "get_node_from_key",
        "initialize",
        "pubsub",
        "subscribe",
        "get_message",
        "ping",
        "aclose",
        "master_for",
        "from_url",
        "connection_pool",
        # uvicorn: a Config's and a Server's documented use.
        "run",
        "serve",
    }
)

#: Names the listed classes share with the standard library objects the
#: gateway uses them on (the walk goes by name off ``self``).
ELSEWHERE = frozenset(
    {
        # urllib.parse.urlsplit() results (settings, Redis URLs).
        "scheme",
        "username",
        "password",
        # socket.socket.listen (the admin listener's socket).
        "listen",
    }
)


@dataclass(frozen=True)
class Use:
    path: str
    line: int
    name: str
    owner: str  # the foreign class it belongs to, "" when found by name only

    def __str__(self) -> str:
        where = f" of {self.owner}" if self.owner else ""
        return f"{self.path}:{self.line}: {self.name}{where}"


def listed() -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for owner, name, _param in internals.names():
        table.setdefault(owner, set()).add(name)
    return table


def _class(owner: str) -> Any:
    module, _, name = owner.partition(":")
    return getattr(importlib.import_module(module), name)


def _owner_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _attributes(cls: type, instances: dict[str, Any], *, commands: bool = True) -> set[str]:
    """What ``cls`` and its instances have; without Redis commands unless ``commands``."""
    found = {
        name
        for name in dir(cls)
        if commands or not _defined_by(cls, name).__module__.startswith("redis.commands")
    }
    for base in cls.__mro__:
        instance = instances.get(_owner_of(base))
        if instance is not None:
            found |= set(getattr(instance, "__dict__", {}))
    return found - set(dir(object))


def _defined_by(cls: type, name: str) -> type:
    return next((k for k in cls.__mro__ if name in vars(k)), object)


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(GATEWAY.rglob("*.py")):
        if path.name == "internals.py":
            continue  # the list itself, and the probes that make instances
        yield str(path.relative_to(GATEWAY.parent)), ast.parse(path.read_text(), str(path))


def _own_names(tree: ast.Module) -> set[str]:
    """Every attribute name the gateway's own code defines."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    names.add(statement.target.id)
                elif isinstance(statement, ast.Assign):
                    names.update(t.id for t in statement.targets if isinstance(t, ast.Name))
                    if any(
                        isinstance(t, ast.Name) and t.id == "__slots__" for t in statement.targets
                    ):
                        names.update(
                            e.value
                            for e in ast.walk(statement.value)
                            if isinstance(e, ast.Constant) and isinstance(e.value, str)
                        )
    return names


def _imported(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, for the imports of a module."""
    origins: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                origins[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                origins[alias.asname or alias.name.partition(".")[0]] = alias.name
    return origins


def _resolve(expr: ast.expr, imported: dict[str, str]) -> type | None:
    """The foreign class a base-class expression names, if it names one."""
    dotted = ast.unparse(expr)
    head, _, rest = dotted.partition(".")
    if head not in imported or imported[head].partition(".")[0] not in FOREIGN:
        return None
    path = imported[head] + ("." + rest if rest else "")
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        found = importlib.import_module(path)
    return found if isinstance(found, type) else None


def _through_self(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "self"
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
    )


def subclass_uses(instances: dict[str, Any]) -> Iterator[Use]:
    """Overrides and inherited attributes of gateway classes with a foreign base."""
    for path, tree in _modules():
        imported = _imported(tree)
        for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
            bases = [b for b in (_resolve(e, imported) for e in cls.bases) if b is not None]
            for base in bases:
                inherited = _attributes(base, instances)
                for node in cls.body:
                    if (
                        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                        and node.name in inherited
                    ):
                        yield Use(path, node.lineno, node.name, _where(base, node.name))
                for sub in ast.walk(cls):
                    if (
                        isinstance(sub, ast.Attribute)
                        and _through_self(sub.value)
                        and sub.attr in inherited
                    ):
                        yield Use(path, sub.lineno, sub.attr, _where(base, sub.attr))


def _where(base: type, name: str) -> str:
    """The class in ``base``'s MRO that the name is listed (or documented) under."""
    for cls in base.__mro__:
        owner = _owner_of(cls)
        if name in listed().get(owner, set()) or name in PUBLIC.get(owner, ()):
            return owner
    return _owner_of(base)


def named_uses(instances: dict[str, Any]) -> Iterator[Use]:
    """Attributes of the listed classes, and foreign private names, used on any object."""
    trees = list(_modules())
    own: set[str] = set()
    for _path, tree in trees:
        own |= _own_names(tree)
    theirs: set[str] = set()
    for owner in listed():
        if owner.partition(":")[2]:
            # Redis commands (client.get(...)) are the client's public API.
            theirs |= _attributes(_class(owner), instances, commands=False)
    for path, tree in trees:
        imported = _imported(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr in own:
                continue
            receiver = node.value
            if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls", *imported):
                continue  # our own object, or a module or class of the package itself
            if _through_self(receiver):
                continue
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if private or node.attr in theirs:
                yield Use(path, node.lineno, node.attr, "")


def unlisted(uses: Iterator[Use]) -> list[str]:
    table = listed()
    every = set().union(*table.values())
    wrong = []
    for use in uses:
        if use.owner:
            ok = use.name in table.get(use.owner, set()) or use.name in PUBLIC.get(use.owner, ())
        else:
            ok = use.name in every or use.name in PUBLIC_CALLS or use.name in ELSEWHERE
        if not ok:
            wrong.append(str(use))
    return sorted(set(wrong))


def test_every_use_of_a_dependency_internal_is_listed() -> None:
    instances = internals._instances()
    uses = [*subclass_uses(instances), *named_uses(instances)]
    assert uses, "the walk found nothing: it is not looking"
    assert unlisted(iter(uses)) == [], "add these to gateway/internals.py INTERNALS"


def test_the_walk_finds_an_unlisted_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # Proof that the test above can fail: take listed names away, one of
    # each kind the walk looks for, and it reports their uses.
    trimmed = {
        owner: tuple(n for n in names if n not in ("on_url", "flow", "connection_kwargs"))
        for owner, names in internals.INTERNALS.items()
    }
    monkeypatch.setattr(internals, "INTERNALS", trimmed)
    instances = internals._instances()
    wrong = unlisted(iter([*subclass_uses(instances), *named_uses(instances)]))
    assert any(w.endswith(": on_url of " + _owner_of(HttpToolsProtocol)) for w in wrong)
    assert any(w.endswith(": flow of " + _owner_of(HttpToolsProtocol)) for w in wrong)
    assert any(w.endswith(": connection_kwargs") for w in wrong)


def test_every_listed_name_exists_in_the_installed_packages() -> None:
    assert internals.missing() is None


def test_a_missing_method_is_named_with_the_package_and_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(HttpToolsProtocol, "on_url")
    version = metadata.version("uvicorn")
    assert internals.missing() == (
        f"uvicorn {version} lacks HttpToolsProtocol.on_url, which the gateway relies on; "
        "install a uvicorn release that pyproject.toml declares"
    )


def test_a_missing_instance_attribute_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    # message_event is set in the cycle's __init__, not on the class.
    original = RequestResponseCycle.__init__

    def renamed(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.request_event = self.message_event
        del self.message_event

    monkeypatch.setattr(RequestResponseCycle, "__init__", renamed)
    problem = internals.missing()
    assert problem is not None
    assert problem.startswith("uvicorn ")
    assert "RequestResponseCycle.message_event" in problem


def test_a_renamed_keyword_argument_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from redis.asyncio.connection import AbstractConnection

    async def disconnect(self: Any, now: bool = False) -> None:
        return None

    monkeypatch.setattr(AbstractConnection, "disconnect", disconnect)
    problem = internals.missing()
    assert problem is not None
    assert problem.startswith(f"redis {metadata.version('redis')} lacks ")
    assert "Connection.disconnect(nowait=...)" in problem


def test_serve_refuses_to_start_without_a_listed_name() -> None:
    # A real `chatkit-gateway serve`, with one uvicorn hook taken away first:
    # one line on stderr, a distinct exit status, and the port never bound.
    port = free_port()
    env = gateway_env("http://127.0.0.1:9", port=port)
    code = (
        "from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol\n"
        "del HttpToolsProtocol.on_header\n"
        "from gateway.cli import main\n"
        "raise SystemExit(main(['serve']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 4, done.stderr
    lines = done.stderr.decode().splitlines()
    version = metadata.version("uvicorn")
    assert lines == [
        f"chatkit-gateway: uvicorn {version} lacks HttpToolsProtocol.on_header, which the "
        "gateway relies on; install a uvicorn release that pyproject.toml declares"
    ]
    assert b"Uvicorn running" not in done.stderr
