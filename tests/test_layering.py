"""Imports flow one way (DESIGN.md "Layers"); app/core stays pure and I/O-free.

Every module is read with ``ast``, not imported, so an import inside a function or under
``if TYPE_CHECKING:`` counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"

# What app/core may import: the standard library's pure parts, pydantic, and orjson (the
# JSON codec events are encoded with once, pyproject.toml); nothing that waits, reads a
# clock, touches files, sockets or processes.
CORE_ALLOWED = {
    "__future__",
    "abc",
    "bisect",
    "collections",
    "copy",
    "dataclasses",
    "enum",
    "functools",
    "heapq",
    "itertools",
    "json",
    "math",
    "operator",
    "orjson",
    "pydantic",
    "re",
    "secrets",
    "types",
    "typing",
}
# Named outright so that widening the allow-list by mistake still fails here.
CORE_FORBIDDEN = {
    "asyncio",
    "sqlite3",
    "aiosqlite",
    "starlette",
    "uvicorn",
    "websockets",
    "socket",
    "time",
    "os",
    "threading",
    "subprocess",
    "pathlib",
    "io",
    "logging",
    "random",
    "datetime",
    "importlib",
    "app.engine",
    "app.store",
    "app.transport",
    "app.agents",
    "app.config",
    "app.cli",
}


def modules(package: str) -> list[Path]:
    return sorted((APP / package).rglob("*.py"))


def module_name(path: Path, root: Path = APP.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, root: Path = APP.parent) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved against ``root``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            # ``from app import engine`` imports app.engine.
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (getattr(node.func, "id", None) or getattr(node.func, "attr", None))
            in ("__import__", "import_module")
        ):
            names.add("<dynamic import>")
    return names


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_packages_exist() -> None:
    for package in ("core", "engine", "store", "access", "transport", "agents"):
        assert modules(package), package
    assert {module_name(path) for path in modules("core")} >= {
        "app.core",
        "app.core.events",
        "app.core.ids",
        "app.core.log",
        "app.core.snapshot",
    }


def test_imported_names_sees_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "app" / "core"
    package.mkdir(parents=True)
    module = package / "probe.py"
    module.write_text(
        "import os.path\n"
        "from . import events\n"
        "from .log import EventLog\n"
        "from .. import engine\n"
        "def f():\n"
        "    import asyncio\n"
        "    return __import__('socket')\n",
        encoding="utf-8",
    )
    names = imported_names(module, tmp_path)
    assert {
        "os.path",
        "app.core",
        "app.core.events",
        "app.core.log",
        "app.core.log.EventLog",
        "app",
        "app.engine",
        "asyncio",
        "<dynamic import>",
    } <= names


@pytest.mark.parametrize("path", modules("core"), ids=module_name)
def test_core_imports_only_pure_modules(path: Path) -> None:
    names = imported_names(path)
    forbidden = {name for name in names if any(within(name, bad) for bad in CORE_FORBIDDEN)}
    assert not forbidden, f"{module_name(path)} imports {sorted(forbidden)}"
    outside = {
        name
        for name in names
        if not within(name, "app.core")
        and not within(name, "app.errors")  # the exception tree is pure: classes and codes
        and name.split(".")[0] not in CORE_ALLOWED
    }
    assert not outside, f"{module_name(path)} imports {sorted(outside)} (not on the allow-list)"


def test_the_allow_list_forbids_what_it_must() -> None:
    assert not CORE_ALLOWED & {name.split(".")[0] for name in CORE_FORBIDDEN}


@pytest.mark.parametrize("path", modules("engine"), ids=module_name)
def test_engine_does_not_import_transport_or_agents(path: Path) -> None:
    bad = {
        name
        for name in imported_names(path)
        if within(name, "app.transport") or within(name, "app.agents")
    }
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("store"), ids=module_name)
def test_store_does_not_import_engine_or_transport(path: Path) -> None:
    bad = {
        name
        for name in imported_names(path)
        if within(name, "app.engine") or within(name, "app.transport")
    }
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("access"), ids=module_name)
def test_access_decides_without_engine_or_transport(path: Path) -> None:
    # Access may use core and the store (the share table), nothing above them.
    bad = {
        name
        for name in imported_names(path)
        if any(within(name, layer) for layer in ("app.engine", "app.transport", "app.agents"))
    }
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("engine") + modules("store"), ids=module_name)
def test_engine_and_store_know_nothing_of_access(path: Path) -> None:
    bad = {name for name in imported_names(path) if within(name, "app.access")}
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


# What transport may import from the app: everything below it. The agents only from
# app/transport/app.py, the composition root: it registers the built-in agents
# (app.agents.builtin), and the openai agent when the settings configure one (imported
# there, lazily), into a registry (app.agents.registry). Every other transport module
# reaches an agent through the engine, by name.
TRANSPORT_ALLOWED = (
    "app.transport",
    "app.access",
    "app.cluster",
    "app.engine",
    "app.store",
    "app.core",
)
TRANSPORT_ALLOWED_LEAVES = ("app.errors", "app.config")
TRANSPORT_AGENTS_ALLOWED = {
    "app/transport/app.py": {
        "app.agents.builtin",
        "app.agents.builtin.register_builtins",
        "app.agents.registry",
        "app.agents.registry.Registry",
        "app.agents.registry.default_registry",
        "app.agents.openai",
        "app.agents.openai.register_openai",
    }
}


def app_names(names: set[str]) -> set[str]:
    """The app's own modules among ``names``; ``from app import __version__`` (the
    package's version string, which every layer may read) left out."""
    return {
        name for name in names if within(name, "app") and name not in ("app", "app.__version__")
    }


@pytest.mark.parametrize("path", modules("transport"), ids=module_name)
def test_transport_imports_only_the_layers_below_it(path: Path) -> None:
    relative = path.relative_to(APP.parent).as_posix()
    agents_allowed = TRANSPORT_AGENTS_ALLOWED.get(relative, set())
    bad = {
        name
        for name in app_names(imported_names(path))
        if not any(within(name, layer) for layer in TRANSPORT_ALLOWED + TRANSPORT_ALLOWED_LEAVES)
        and name not in agents_allowed
    }
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("cluster"), ids=module_name)
def test_the_cluster_is_a_backend_of_the_engine(path: Path) -> None:
    # A node's manager and its broker: the engine, the store and core below them, nothing
    # that serves clients or runs agents.
    bad = {
        name
        for name in imported_names(path)
        if any(within(name, layer) for layer in ("app.transport", "app.agents", "app.access"))
    }
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


# What the agents may import from the app: their own package, core (events, ids), errors,
# and config (the openai agent reads its endpoint and model from the settings). The engine
# only through RunContext: app/agents/context.py wraps the engine's LiveRun, and the
# registry names LiveRun as the type of the run it hands to RunContext; the adapters
# (builtin, openai, langgraph) see the RunContext alone.
AGENTS_ALLOWED = ("app.agents", "app.core", "app.errors", "app.config")
AGENTS_ENGINE_ALLOWED = {
    "app/agents/context.py": {"app.engine.run", "app.engine.run.LiveRun"},
    "app/agents/registry.py": {"app.engine.run", "app.engine.run.LiveRun"},
}


@pytest.mark.parametrize("path", modules("agents"), ids=module_name)
def test_agents_reach_the_engine_only_through_run_context(path: Path) -> None:
    relative = path.relative_to(APP.parent).as_posix()
    engine_allowed = AGENTS_ENGINE_ALLOWED.get(relative, set())
    bad = {
        name
        for name in app_names(imported_names(path))
        if not any(within(name, layer) for layer in AGENTS_ALLOWED) and name not in engine_allowed
    }
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


# The command line is the top: app/cli.py may import any module, and none imports it but
# app/__main__.py (``python -m app``).
CLI_IMPORTERS = {"app/cli.py", "app/__main__.py"}


@pytest.mark.parametrize(
    "path",
    [
        path
        for path in sorted(APP.rglob("*.py"))
        if path.relative_to(APP.parent).as_posix() not in CLI_IMPORTERS
    ],
    ids=module_name,
)
def test_nothing_imports_the_cli(path: Path) -> None:
    bad = {name for name in imported_names(path) if within(name, "app.cli")}
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


def test_the_exceptions_stay_exact() -> None:
    # Each name an exception allows is still imported: one no longer needed goes.
    exceptions = {**TRANSPORT_AGENTS_ALLOWED, **AGENTS_ENGINE_ALLOWED}
    for relative, allowed in exceptions.items():
        unused = allowed - imported_names(APP.parent / relative)
        assert not unused, f"{relative} no longer imports {sorted(unused)}"
