"""The structure drawing: every module of ``sts/``, its imports, and the floor it lives on.

    scripts/structure                 the drawing as text, floors from the lowest up
    scripts/structure --mermaid       the same as a Mermaid flowchart
    scripts/structure --markdown      docs/structure.md as it should read
    scripts/structure --write         (re)write docs/structure.md
    scripts/structure --check         exit 1 when docs/structure.md is out of date

Every module is read with :mod:`ast`, never imported.  An import counts wherever it
is written: at module level, inside a function (run later, but still a dependency)
or under ``if TYPE_CHECKING:`` (for the type checker only, but still a dependency).
A package's ``__init__`` is a node of its own.  ``from X import y`` is an arrow to
the module ``X.y`` when there is one, else to ``X``.

Floors, lowest first; an import may point down or stay on its floor, never up:

    0  errors        sts (the version), sts.errors
    1  pure          sts.core, sts.protocol: the decision pipeline and the wire formats
    2  settings      sts.settings: read by the outer floors only
    3  I/O and HTTP  sts.adapters, sts.http, sts.migrations, sts.dev
    4  wiring        sts.app
    5  entry points  sts.cli, sts.serving, sts.serving_limits

``tests/test_architecture.py`` checks the graph (no import circle, no import from a
higher floor) with the functions here, and that docs/structure.md is up to date.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC = REPO_ROOT / "docs" / "structure.md"

#: How an import is written, strongest first: at module level, under ``if TYPE_CHECKING:``
#: or inside a function.
MODULE, TYPING, FUNCTION = "module", "typing", "function"
_STRENGTH = {MODULE: 0, TYPING: 1, FUNCTION: 2}

#: A module and what it imports: ``{module: {imported module: how}}``.
Graph = dict[str, dict[str, str]]
#: Floors, lowest first: a name and the packages (or modules) on it.  A name matches a
#: module when it is the module or one of its packages; ``sts`` itself matches only itself.
Floors = Sequence[tuple[str, Sequence[str]]]

FLOORS: Floors = (
    ("errors", ("sts", "sts.errors")),
    ("pure", ("sts.core", "sts.protocol")),
    ("settings", ("sts.settings",)),
    ("I/O and HTTP", ("sts.adapters", "sts.http", "sts.migrations", "sts.dev")),
    ("wiring", ("sts.app", "sts.wiring")),
    ("entry points", ("sts.cli", "sts.serving", "sts.serving_limits")),
)
#: What each floor is for, in the drawing.
FLOOR_NOTES = {
    "errors": "one exception per OAuth error; the package's version",
    "pure": "the decision pipeline and the wire formats: no I/O library, no outer floor",
    "settings": "frozen settings, read and validated once",
    "I/O and HTTP": "adapters behind the ports, the Flask blueprints, migrations, the dev issuer",
    "wiring": "create_app: adapters wired into the pipeline",
    "entry points": "the sts command and the server",
}


# -- reading imports ---------------------------------------------------------------------------


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    """``sts/core/policy/index.py`` -> ``sts.core.policy.index``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path, root: Path) -> str:
    name = module_name(path, root)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _source(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, how: str = MODULE) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement under ``node``, at any depth, with how it is written."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, how
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _imports(child, FUNCTION)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            inner = TYPING if how == MODULE else how
            for statement in child.body:
                yield from _imports(ast.Module(body=[statement], type_ignores=[]), inner)
            for statement in child.orelse:
                yield from _imports(ast.Module(body=[statement], type_ignores=[]), how)
        else:
            yield from _imports(child, how)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def imported_modules(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (also inside functions).

    ``from X import y`` counts as importing ``X`` and ``X.y`` (``y`` may be a module:
    ``from .. import app``).  For the checks on what a layer may import at all.
    """
    package = _package_of(path, root)
    names: set[str] = set()
    for node, _ in _imports(_parse(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        else:
            source = _source(node, package)
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _known(name: str, modules: set[str]) -> str | None:
    """The longest prefix of ``name`` that is one of ``modules``."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(package: str = "sts", root: Path = REPO_ROOT) -> Graph:
    """Every module of ``package`` (subpackages included) and the modules of it that it imports."""
    paths = {module_name(p, root): p for p in sorted((root / package.replace(".", "/")).rglob("*.py"))}
    modules = set(paths)
    graph: Graph = {}
    for name, path in sorted(paths.items()):
        targets: dict[str, str] = {}
        for node, how in _imports(_parse(path)):
            if isinstance(node, ast.Import):
                found = [_known(alias.name, modules) for alias in node.names]
            else:
                source = _source(node, _package_of(path, root))
                named = (f"{source}.{alias.name}" for alias in node.names)
                found = [target if target in modules else _known(source, modules) for target in named]
            for target in found:
                if target is None or target == name:
                    continue
                if target not in targets or _STRENGTH[how] < _STRENGTH[targets[target]]:
                    targets[target] = how
        graph[name] = dict(sorted(targets.items()))
    return graph


# -- checking ----------------------------------------------------------------------------------


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[tuple[str, ...]]:
    """Import circles, as ``(a, b, ..., a)`` starting from the first module by name.

    Modules that import each other, directly or not, form a tangle (a strongly connected
    component, found with Tarjan's algorithm); for each of its modules the shortest circle
    through it is reported (once).  Empty when the graph has no circle.
    """
    adjacency = {node: sorted(set(targets)) for node, targets in graph.items()}
    for targets in list(adjacency.values()):
        for target in targets:
            adjacency.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    tangles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in adjacency[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            tangle = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                tangle.append(member)
                if member == node:
                    break
            if len(tangle) > 1 or node in adjacency[node]:
                tangles.append(sorted(tangle))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * len(adjacency) + 100))
    try:
        for node in sorted(adjacency):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)
    circles = set()
    for tangle in tangles:
        for member in tangle:
            circle = _shortest_circle(member, set(tangle), adjacency)
            first = circle.index(min(circle))
            circles.add((*circle[first:-1], *circle[:first], circle[first]))
    return sorted(circles)


def _shortest_circle(start: str, members: set[str], adjacency: Mapping[str, list[str]]) -> tuple[str, ...]:
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in adjacency[node]:
                if target == start:
                    path = [start, node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return (*reversed(path[1:]), start)
                if target in members and target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle through {start}")  # a tangle always has one


def describe_circle(graph: Graph, circle: Sequence[str]) -> str:
    """``a -> b (in function) -> a``: a circle with how each of its imports is written."""
    parts = [circle[0]]
    for source, target in itertools.pairwise(circle):
        parts.append(_arrow(target, graph.get(source, {}).get(target, MODULE)))
    return " -> ".join(parts)


def floor_of(module: str, floors: Floors = FLOORS) -> int | None:
    """The floor ``module`` lives on (0 is the lowest), or None when no floor names it."""
    best: tuple[int, int] | None = None
    for number, (_, names) in enumerate(floors):
        for name in names:
            # ``sts`` names only the package itself, not everything in it.
            matches = module == name or ("." in name and module.startswith(name + "."))
            if matches and (best is None or len(name) > best[1]):
                best = (number, len(name))
    return None if best is None else best[0]


def unplaced(graph: Mapping[str, Iterable[str]], floors: Floors = FLOORS) -> list[str]:
    """Modules that no floor names."""
    return sorted(m for m in graph if floor_of(m, floors) is None)


def upward_imports(graph: Mapping[str, Iterable[str]], floors: Floors = FLOORS) -> list[str]:
    """Every import from a higher floor, as ``"a (floor 1) imports b (floor 3)"``."""
    found = []
    for module, targets in sorted(graph.items()):
        low = floor_of(module, floors)
        for target in sorted(targets):
            high = floor_of(target, floors)
            if low is not None and high is not None and high > low:
                found.append(f"{module} (floor {low}) imports {target} (floor {high})")
    return found


# -- drawing -----------------------------------------------------------------------------------


def _by_floor(graph: Graph, floors: Floors) -> list[list[str]]:
    placed: list[list[str]] = [[] for _ in floors]
    for module in sorted(graph):
        number = floor_of(module, floors)
        if number is not None:
            placed[number].append(module)
    return placed


def _arrow(target: str, how: str) -> str:
    return {MODULE: target, TYPING: f"{target} (typing)", FUNCTION: f"{target} (in function)"}[how]


def render_text(graph: Graph, floors: Floors = FLOORS) -> str:
    """Floors from the lowest up; under each, its modules and what each imports."""
    lines = []
    for number, modules in enumerate(_by_floor(graph, floors)):
        name = floors[number][0]
        lines.append(f"floor {number}: {name} -- {FLOOR_NOTES.get(name, '')}".rstrip(" -"))
        for module in modules:
            arrows = ", ".join(_arrow(t, how) for t, how in graph[module].items())
            line = f"{module} -> {arrows}" if arrows else module
            lines += textwrap.wrap(
                line, 100, initial_indent="  ", subsequent_indent=" " * 6, break_on_hyphens=False
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _node(module: str) -> str:
    return "m_" + "".join(c if c.isalnum() else "_" for c in module)


def render_mermaid(graph: Graph, floors: Floors = FLOORS) -> str:
    """A Mermaid flowchart, bottom to top: one box per floor, an arrow per import (dotted when
    it is inside a function or for the type checker only)."""
    lines = ["flowchart BT"]
    for number, modules in enumerate(_by_floor(graph, floors)):
        lines.append(f'  subgraph floor{number}["floor {number}: {floors[number][0]}"]')
        lines.extend(f'    {_node(m)}["{m}"]' for m in modules)
        lines.append("  end")
    for module, targets in sorted(graph.items()):
        for target, how in targets.items():
            lines.append(f"  {_node(module)} {'-->' if how == MODULE else '-.->'} {_node(target)}")
    return "\n".join(lines) + "\n"


def by_package(graph: Graph, depth: int = 2) -> Graph:
    """The graph with every module folded into its package ``depth`` names deep (``sts.core``)."""
    folded: Graph = {}
    for module, targets in graph.items():
        source = ".".join(module.split(".")[:depth])
        arrows = folded.setdefault(source, {})
        for target, how in targets.items():
            target = ".".join(target.split(".")[:depth])
            if target != source and (target not in arrows or _STRENGTH[how] < _STRENGTH[arrows[target]]):
                arrows[target] = how
    return {module: dict(sorted(targets.items())) for module, targets in sorted(folded.items())}


def render_markdown(graph: Graph, floors: Floors = FLOORS) -> str:
    """docs/structure.md: the floors, what the checks found, and the drawing in text and Mermaid."""
    cycles = find_cycles(graph)
    upward = upward_imports(graph, floors)
    arrows = sum(len(t) for t in graph.values())
    out = [
        "# Structure",
        "",
        "<!-- Generated by `scripts/structure --write` from the source; do not edit by hand. -->",
        "",
        f"Every module of `sts/` ({len(graph)} modules, {arrows} imports between them), read with",
        "`ast` by `scripts/structure`, on the floor it lives on. An import may point down or stay on",
        "its floor, never up, and no modules may import each other in a circle; imports inside",
        "functions and under `if TYPE_CHECKING:` count too. `tests/test_architecture.py` checks both,",
        "and that this page is up to date: after moving or adding modules, run",
        "`scripts/structure --write` and commit the result.",
        "",
        "| floor | name | packages and modules | modules | what lives there |",
        "| --- | --- | --- | --- | --- |",
    ]
    placed = _by_floor(graph, floors)
    for number in reversed(range(len(floors))):
        name, names = floors[number]
        listed = ", ".join(f"`{n}`" for n in names)
        out.append(f"| {number} | {name} | {listed} | {len(placed[number])} | {FLOOR_NOTES.get(name, '')} |")
    out += ["", "## What the checks find", ""]
    out += [f"- Import circle: {describe_circle(graph, cycle)}" for cycle in cycles]
    out += [f"- Import from a higher floor: {line}" for line in upward]
    out += [f"- No floor for: `{m}`" for m in unplaced(graph, floors)]
    if not cycles and not upward and not unplaced(graph, floors):
        out.append("Nothing: no import circle, no import from a higher floor.")
    out += [
        "",
        "## Packages",
        "",
        "The drawing below, with every module folded into its package (dotted: only imports inside",
        "a function or for the type checker).",
        "",
        "```mermaid",
        render_mermaid(by_package(graph), floors).rstrip(),
        "```",
        "",
        "## The drawing",
        "",
        "Floors from the lowest up; each module with the modules it imports. *(in function)*:",
        "imported inside a function; *(typing)*: under `if TYPE_CHECKING:`.",
        "",
        "```text",
        render_text(graph, floors).rstrip(),
        "```",
        "",
        "## The drawing as Mermaid",
        "",
        "Dotted arrows are imports inside a function or for the type checker only.",
        "",
        "```mermaid",
        render_mermaid(graph, floors).rstrip(),
        "```",
        "",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/structure", description=__doc__.split("\n")[0])
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--mermaid", action="store_true", help="print the drawing as a Mermaid flowchart")
    shown.add_argument("--markdown", action="store_true", help="print docs/structure.md as it should read")
    doc = DOC.relative_to(REPO_ROOT)
    shown.add_argument("--write", action="store_true", help=f"write {doc}")
    shown.add_argument("--check", action="store_true", help=f"exit 1 if {doc} is out of date")
    args = parser.parse_args(argv)
    graph = import_graph()
    if args.write:
        DOC.write_text(render_markdown(graph), encoding="utf-8")
        print(f"wrote {doc}")
    elif args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != render_markdown(graph):
            print(f"{doc} is out of date: run scripts/structure --write", file=sys.stderr)
            return 1
    elif args.mermaid:
        sys.stdout.write(render_mermaid(graph))
    elif args.markdown:
        sys.stdout.write(render_markdown(graph))
    else:
        sys.stdout.write(render_text(graph))
    return 0


if __name__ == "__main__":
    sys.exit(main())
