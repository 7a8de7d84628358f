"""The layers, checked: imports point down only, and no modules import each other in a circle.

    cli, serving -> app -> wiring -> http, adapters, migrations, dev -> settings -> core, protocol -> errors

* every module of ``sts/`` lives on a floor (``scripts/structure.py``, drawn in
  docs/structure.md); none imports from a higher floor, and there is no import circle;
* ``sts/core`` and ``sts/protocol`` (the decision pipeline and the wire formats) import no
  web framework, database, cache, HTTP client, server, metrics or tracing library, and no
  outer layer;
* ``sts/http`` (the thin Flask layer) imports neither the app that wires it nor an adapter,
  and does not read the services out of the application's globals: each blueprint is built
  by a factory given the services it uses (``sts/app.py`` and ``sts/wiring/`` wire the adapters in);
* ARCHITECTURE.md names only paths and modules that exist, and the token-exchange steps the
  docstring of ``sts/core/exchange/__init__.py`` lists, each of which the code has.

Checked statically, with :mod:`ast` (the scanner of ``scripts/structure.py``), over every
module of each package and its subpackages, also for imports inside functions and under
``if TYPE_CHECKING:``; and once at run time for the pure packages.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
STS = REPO_ROOT / "sts"


def _load_structure() -> ModuleType:
    """``scripts/structure.py``: the drawing, and the import scanner these checks share with it."""
    spec = importlib.util.spec_from_file_location("structure", REPO_ROOT / "scripts" / "structure.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


structure = _load_structure()
module_name = structure.module_name
imported_modules = structure.imported_modules

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


def modules_of(package: str) -> list[Path]:
    """Every module of ``sts/<package>``, subpackages included."""
    return sorted((STS / package).rglob("*.py"))


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


# -- the floors and the import graph (scripts/structure.py, docs/structure.md) -------------------


def test_sts_has_no_import_circle() -> None:
    graph = structure.import_graph()
    circles = [structure.describe_circle(graph, c) for c in structure.find_cycles(graph)]
    assert circles == [], "import circles:\n" + "\n".join(circles)


def test_every_module_has_a_floor_and_none_imports_from_a_higher_one() -> None:
    graph = structure.import_graph()
    assert "sts.core.policy.evaluate" in graph and "sts" in graph and "sts.core" in graph
    assert structure.unplaced(graph) == []
    assert structure.upward_imports(graph) == []


def test_the_floors_agree_with_the_layer_rules() -> None:
    # Everything the pure packages may not import lives on a higher floor than they do.
    pure = structure.floor_of("sts.core")
    assert pure == structure.floor_of("sts.protocol") == 1
    assert all(structure.floor_of(name) > pure for name in ABOVE_PURE)
    assert structure.floor_of("sts.errors") == structure.floor_of("sts") == 0 < pure
    assert structure.floor_of("sts.cli") == structure.floor_of("sts.serving") == len(structure.FLOORS) - 1


def test_the_cycle_finder_finds_circles() -> None:
    acyclic = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert structure.find_cycles(acyclic) == []
    circle = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert structure.find_cycles(circle) == [("a", "b", "c", "a")]
    assert structure.find_cycles({"x": {"x"}}) == [("x", "x")]
    # Two circles through one module are both reported; each starts at its first module by name.
    tangle = {"m": {"r", "s"}, "r": {"m"}, "s": {"m"}, "t": {"u"}, "u": {"t"}}
    assert structure.find_cycles(tangle) == [("m", "r", "m"), ("m", "s", "m"), ("t", "u", "t")]
    # Modules imported but not scanned are leaves.
    assert structure.find_cycles({"a": {"outside"}}) == []


def test_the_floor_check_finds_upward_imports() -> None:
    floors = (("low", ("p", "p.low")), ("high", ("p.high",)))
    graph = {"p.low.x": {"p.high.y", "p"}, "p.high.y": {"p.low.x", "p.high.z"}, "p.high.z": set()}
    assert structure.upward_imports(graph, floors) == ["p.low.x (floor 0) imports p.high.y (floor 1)"]
    assert structure.upward_imports({"p.high.y": {"p.low.x"}}, floors) == []
    # A name without a dot names only itself: ``p`` does not place ``p.other``.
    assert structure.floor_of("p", floors) == 0 and structure.floor_of("p.other", floors) is None
    assert structure.unplaced({"p.other": set(), "p.low": set()}, floors) == ["p.other"]
    assert structure.floor_of("p.highway", floors) is None


def test_the_graph_counts_imports_in_functions_and_for_the_type_checker(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("import pkg.top\n")
    (package / "top.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .low import Thing\n"
        "else:\n    import json\n"
    )
    (package / "low.py").write_text("import os\ndef later():\n    from .sub.leaf import name\n")
    graph = structure.import_graph("pkg", tmp_path)
    assert graph == {
        "pkg": {},
        "pkg.low": {"pkg.sub.leaf": structure.FUNCTION},
        "pkg.sub": {"pkg.sub.leaf": structure.MODULE},
        "pkg.sub.leaf": {"pkg.top": structure.MODULE},
        "pkg.top": {"pkg.low": structure.TYPING},
    }
    [circle] = structure.find_cycles(graph)
    assert circle == ("pkg.low", "pkg.sub.leaf", "pkg.top", "pkg.low")
    assert structure.describe_circle(graph, circle) == (
        "pkg.low -> pkg.sub.leaf (in function) -> pkg.top -> pkg.low (typing)"
    )


def test_the_structure_page_is_up_to_date() -> None:
    expected = structure.render_markdown(structure.import_graph())
    current = structure.DOC.read_text(encoding="utf-8")
    assert current == expected, "docs/structure.md is out of date: run scripts/structure --write"


@pytest.mark.parametrize("shown", ["--text", "--mermaid"])
def test_the_drawing_shows_floors_from_the_lowest_up(shown: str) -> None:
    args = [] if shown == "--text" else [shown]
    completed = subprocess.run(  # our own interpreter, our own script
        [sys.executable, str(REPO_ROOT / "scripts" / "structure.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=True,
    )
    drawing = completed.stdout
    floors = [drawing.index(f"floor {n}: {name}") for n, (name, _) in enumerate(structure.FLOORS)]
    assert floors == sorted(floors)
    if shown == "--mermaid":
        assert drawing.startswith("flowchart BT\n")
        assert "m_sts_core_policy_evaluate --> m_sts_core_policy_index" in drawing
    else:
        assert "  sts.core.policy.evaluate -> " in drawing


# -- ARCHITECTURE.md names only what exists -------------------------------------------------------

ARCHITECTURE = REPO_ROOT / "ARCHITECTURE.md"
#: A path of the repository (``sts/core/ports.py``, ``tests/e2e/``), or a dotted module (``sts.core.ports``).
NAMED_PATH = re.compile(r"(?<![\w./-])((?:sts|tests|scripts|docs)/[\w./-]*)")
NAMED_MODULE = re.compile(r"(?<![\w./-])(sts(?:\.\w+)+)")


def missing_names(text: str, root: Path = REPO_ROOT) -> list[str]:
    """The paths and ``sts.*`` modules ``text`` names that do not exist under ``root``."""
    missing = [path for path in NAMED_PATH.findall(text) if not (root / path.rstrip(".")).exists()]
    for name in NAMED_MODULE.findall(text):
        base = root.joinpath(*name.split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
            missing.append(name)
    return missing


def exchange_steps() -> list[str]:
    """The "where" column of the pipeline's table, in the docstring of :mod:`sts.core.exchange`."""
    doc = ast.get_docstring(ast.parse((STS / "core" / "exchange" / "__init__.py").read_text()))
    assert doc is not None
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["stage", "step", "where"]) + 1
    end = lines.index("", start)
    last_words = [line.split()[-1] for line in lines[start:end]]
    # A step's name, not the end of a wrapped description ("§3)").
    return [word for word in last_words if re.fullmatch(r"[A-Za-z_][\w.]*", word)]


def test_architecture_names_only_paths_and_modules_that_exist() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert "sts/core/exchange/__init__.py" in text and "sts/adapters/sql/single_use.py" in text
    assert missing_names(text) == []


def test_architecture_lists_the_pipeline_steps_the_exchange_runs() -> None:
    import sts.core.exchange

    steps = exchange_steps()
    assert steps[0] == "request.parse_request" and steps[-1] == "TokenExchange._commit" and len(steps) == 17
    for step in steps:
        target: object = sts.core.exchange
        for attribute in step.split("."):
            target = getattr(target, attribute)  # the docstring names what the code has
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert [step for step in steps if f"`{step}`" not in text] == []


def test_the_architecture_check_finds_what_is_gone(tmp_path: Path) -> None:
    (tmp_path / "sts" / "core").mkdir(parents=True)
    (tmp_path / "sts" / "core" / "__init__.py").write_text("")
    (tmp_path / "sts" / "core" / "ports.py").write_text("")
    text = "See `sts/core/ports.py`, `sts/core/`, sts.core.ports, sts.core; not sts/cli.py, sts.core.policy."
    assert missing_names(text, tmp_path) == ["sts/cli.py", "sts.core.policy"]


#: The largest a module of ``sts/`` may grow before it is split by responsibility (issue 11).
MAX_MODULE_LINES = 450


def test_no_module_of_sts_is_over_the_size_limit() -> None:
    sizes = {path.relative_to(REPO_ROOT): len(path.read_text().splitlines()) for path in STS.rglob("*.py")}
    assert len(sizes) > 100
    assert {str(path): lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}


#: A PEM private key block (PKCS#1, PKCS#8, SEC 1, OpenSSH): written as two parts here, so this file
#: is not one.
_PRIVATE_PEM = re.compile(rb"-----BEGIN (?:RSA |EC |OPENSSH |ENCRYPTED )?" + rb"PRIVATE KEY-----")


def _tracked_files_holding_a_private_key(repo: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    found = []
    for name in filter(None, listed.decode().split("\0")):
        path = repo / name
        if path.is_file() and _PRIVATE_PEM.search(path.read_bytes()):
            found.append(name)
    return found


def test_no_private_key_is_committed() -> None:
    """Tests and the service generate their keys; a key file written into the checkout (a
    development issuer's, by a command run in the wrong directory) was once committed."""
    assert _tracked_files_holding_a_private_key(REPO_ROOT) == []


def test_the_private_key_check_finds_one(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "signing-key.pem").write_bytes(pem)
    (tmp_path / "public.txt").write_text("nothing here")
    assert _tracked_files_holding_a_private_key(tmp_path) == ["signing-key.pem"]
