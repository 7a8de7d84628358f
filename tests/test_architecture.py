"""The layers, checked: imports point down only.

    cli, serving -> app -> wiring -> http, adapters -> core, protocol -> errors

* ``sts/core`` and ``sts/protocol`` (the decision pipeline and the wire formats) import no
  web framework, database, cache, HTTP client, server, metrics or tracing library, and no
  outer layer;
* ``sts/http`` (the thin Flask layer) imports neither the app that wires it nor an adapter,
  and does not read the services out of the application's globals: each blueprint is built
  by a factory given the services it uses (``sts/app.py`` and ``sts/wiring/`` wire the adapters in).

Checked statically, with :mod:`ast`, over every module of each package and its subpackages,
also for imports inside functions; and once at run time for the pure packages.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STS = REPO_ROOT / "sts"

#: Libraries the pure packages never import (first component of the module name).
IO_LIBRARIES = (
    "flask",
    "werkzeug",
    "sqlalchemy",
    "redis",
    "requests",
    "psycopg",
    "granian",
    "prometheus_client",
    "opentelemetry",
)
PURE_PACKAGES = ("core", "protocol")
#: What the pure packages may not import from this project: every layer above them.
ABOVE_PURE = (
    "sts.adapters",
    "sts.http",
    "sts.app",
    "sts.wiring",
    "sts.cli",
    "sts.serving",
    "sts.dev",
    "sts.settings",
)
#: What the HTTP layer may not import: the app that wires it, the adapters, and the layers above.
ABOVE_HTTP = ("sts.app", "sts.wiring", "sts.adapters", "sts.cli", "sts.serving", "sts.dev", "sts.settings")


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_of(package: str) -> list[Path]:
    """Every module of ``sts/<package>``, subpackages included."""
    return sorted((STS / package).rglob("*.py"))


def imported_modules(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (also inside functions).

    ``from X import y`` counts as importing ``X`` and ``X.y`` (``y`` may be a module:
    ``from .. import app``).
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offenders(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for package in packages:
        for path in modules_of(package):
            for name in sorted(imported_modules(path)):
                if within(name, forbidden):
                    found.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    return found


def test_core_and_protocol_import_no_io_library_or_outer_layer() -> None:
    assert offenders(PURE_PACKAGES, IO_LIBRARIES + ABOVE_PURE) == []


def test_http_imports_neither_the_app_nor_an_adapter() -> None:
    assert offenders(("http",), ABOVE_HTTP) == []


def test_http_does_not_read_services_from_the_application() -> None:
    """No ``current_app.extensions[...]`` lookup: blueprints are given their services."""
    found = []
    for path in modules_of("http"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "extensions":
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert found == []


def test_the_scans_are_recursive() -> None:
    assert STS / "core" / "profiles" / "github.py" in modules_of("core")
    assert "sts.core.profiles.github" in {module_name(p) for p in modules_of("core")}


def test_core_and_protocol_load_no_io_library() -> None:
    """At run time too: importing every pure module loads none of the libraries (nor, through
    a dependency, one of them)."""
    modules = [module_name(p) for package in PURE_PACKAGES for p in modules_of(package)]
    assert "sts.core.policy" in modules and "sts.protocol.token_exchange" in modules
    assert "sts.core.profiles.kubernetes" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {IO_LIBRARIES!r})))\n"
    )
    completed = subprocess.run(  # our own interpreter, a fixed script
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == []


def test_import_scanner_sees_relative_nested_and_module_imports(tmp_path: Path) -> None:
    # The static checks above are only as good as this scanner: prove it catches the sneaky forms.
    package = tmp_path / "sts" / "http" / "sub"
    package.mkdir(parents=True)
    sample = package / "sample.py"
    sample.write_text(
        "from ...adapters import sql\nfrom .. import ports\nfrom ... import app as application\n"
        "def f():\n    import flask.json\n    from sqlalchemy.orm import Session\n"
    )
    init = package / "__init__.py"
    init.write_text("from . import sample\nfrom .. import wire\n")
    assert imported_modules(sample, tmp_path) == {
        "sts.adapters",
        "sts.adapters.sql",
        "sts.http",
        "sts.http.ports",
        "sts",
        "sts.app",
        "flask.json",
        "sqlalchemy.orm",
        "sqlalchemy.orm.Session",
    }
    assert imported_modules(init, tmp_path) == {
        "sts.http.sub",
        "sts.http.sub.sample",
        "sts.http",
        "sts.http.wire",
    }
    assert within("sts.app", ABOVE_HTTP) and within("sts.adapters.sql", ABOVE_HTTP)
    assert not within("sts.applications", ABOVE_HTTP)


#: Where an import circle once was (readiness -> migrations -> sql -> migrations): none may come back.
NO_CIRCLES = ("sts.adapters", "sts.migrations")


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    """Each module of ``root/sts``, and the modules of the project that importing it runs.

    Imports inside functions and under ``TYPE_CHECKING`` count, and importing ``a.b.c``
    runs ``a/__init__.py`` and ``a/b/__init__.py`` too (with what they import).
    """
    modules = {module_name(path, root): path for path in sorted((root / "sts").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_modules(path, root):
            parts = imported.split(".")
            edges.update(m for i in range(1, len(parts) + 1) if (m := ".".join(parts[:i])) in modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def import_circles(graph: dict[str, set[str]], prefixes: tuple[str, ...]) -> list[list[str]]:
    """Every set of modules that import each other in a circle, with one of them under ``prefixes``."""

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return seen

    reach = {name: reachable(name) for name in graph}
    circles = {
        frozenset({name} | {other for other in reach[name] if name in reach[other]})
        for name in graph
        if within(name, prefixes) and name in reach[name]
    }
    return sorted(sorted(circle) for circle in circles)


def test_no_import_circle_runs_through_the_adapters_or_the_migrations() -> None:
    graph = import_graph()
    assert "sts.adapters.sql.schema" in graph["sts.migrations"]
    assert import_circles(graph, NO_CIRCLES) == []


def test_the_circle_finder_sees_a_circle_through_a_package_init_and_a_function(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "migrations/__init__.py": "from ..adapters.sql import schema\n",
        "adapters/__init__.py": "",
        "adapters/sql/__init__.py": "from . import setup\n",
        "adapters/sql/schema.py": "",
        "adapters/sql/setup.py": "def create():\n    from ...migrations import upgrade\n",
    }
    for relative, text in files.items():
        (tmp_path / "sts" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sts" / relative).write_text(text)
    assert import_circles(import_graph(tmp_path), NO_CIRCLES) == [
        ["sts.adapters.sql", "sts.adapters.sql.setup", "sts.migrations"]
    ]
