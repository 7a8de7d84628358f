"""Reading policy files: YAML with line numbers, checked against the published JSON Schema.

Compilation itself is pure and lives in :mod:`sts.core.policy.compile`; this module
only reads files and reports errors as ``file:line: rule 'name': reason``.
"""

from __future__ import annotations

import functools
import gc
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, cast

import fastjsonschema
import jsonschema
import yaml

from ..core.policy.compile import compile_policy
from ..core.policy.index import PolicySet
from ..errors import ConfigurationError
from ..settings.yaml_reader import AliasesTooLarge, DuplicateKey, read_yaml


@functools.cache
def policy_schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files("sts.schemas").joinpath("policy.schema.json").read_text("utf-8")
    )
    return loaded


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    """The schema validator, built once: building it per file dominated loading many small files."""
    return jsonschema.Draft202012Validator(policy_schema())


@functools.cache
def _fast_check() -> Callable[[Any], Any]:
    """A compiled validator for the common case, a valid document (seven times faster at 10,000 rules).

    The policy schema uses only keywords whose meaning is the same in draft 7, which
    fastjsonschema compiles, and in 2020-12 (no ``$ref`` with sibling keywords); an invalid
    document is always re-checked by ``jsonschema``, whose first error is what is reported.
    """
    schema = dict(policy_schema())
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    # use_default=False: fastjsonschema would otherwise write the schema's "default" values into the
    # document, overriding settings such as default_lifetime.
    return cast("Callable[[Any], Any]", fastjsonschema.compile(schema, use_default=False))


def _schema_errors(doc: Any) -> list[jsonschema.ValidationError]:
    try:
        _fast_check()(doc)
    except fastjsonschema.JsonSchemaException:
        pass
    else:
        return []
    # YAML keys need not be strings (``1: x``, ``null: x``): compare list indexes as numbers and
    # everything else as text, so that sorting never compares an int with a str.
    return sorted(
        _validator().iter_errors(doc),
        key=lambda e: [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in e.path],
    )


def _rules_node(root: yaml.Node | None) -> yaml.SequenceNode | None:
    if not isinstance(root, yaml.MappingNode):
        return None
    for key, value in root.value:
        if key.value == "rules" and isinstance(value, yaml.SequenceNode):
            return value
    return None


def _rule_containing(root: yaml.Node | None, line: int) -> str:
    """``: rule 'name'`` for the rule whose YAML spans ``line`` (1-based), else an empty string."""
    rules = _rules_node(root)
    for item in rules.value if rules is not None else ():
        if not item.start_mark.line + 1 <= line <= item.end_mark.line + 1:
            continue
        if isinstance(item, yaml.MappingNode):
            for k, v in item.value:
                if k.value == "name" and isinstance(v, yaml.ScalarNode):
                    return f": rule {v.value!r}"
    return ""


def read_policy_text(path: Path) -> str:
    """The text of one policy file; :class:`ConfigurationError` when it cannot be read or is not UTF-8."""
    try:
        return path.read_text("utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: not UTF-8 (byte {exc.start})") from None


#: The policy files as read once: each path with its text (see :func:`read_policy_sources`).
PolicySources = tuple[tuple[Path, str], ...]


def read_policy_sources(directory: Path) -> PolicySources:
    """The texts of the policy files of ``directory`` (:func:`policy_files`), read once.

    ``sts serve`` reads them in its main process and gives every worker these texts, never the
    files: a worker started later (one replacing a worker that died) compiles what the others
    compiled, not what the files hold by then (an outside audit: after an edit on disk and a
    worker's death, the two workers of one instance enforced two policies; with a broken file,
    the replacement failed, and granian took the whole server down).
    """
    return tuple((path, read_policy_text(path)) for path in policy_files(directory))


def read_policy_file(path: Path, text: str | None = None) -> dict[str, Any]:
    """Parse and schema-check one file (its ``text``, if given, else what the file holds); errors
    name the file, line and rule.

    The YAML is composed into a node tree once; the tree gives each rule's line and the
    document is constructed from the same tree (loading used to re-parse the whole file for
    every rule, which made a 400-rule file take a minute).
    """
    if text is None:
        text = read_policy_text(path)
    try:
        document = read_yaml(text)
    except DuplicateKey as exc:
        raise ConfigurationError(
            f"{path}:{exc.line}{_rule_containing(exc.root, exc.line)}: duplicate key {exc.key!r} "
            "(YAML would silently keep the last value)"
        ) from None
    except AliasesTooLarge as exc:
        raise ConfigurationError(f"{path}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        where = f"{path}:{exc.problem_mark.line + 1}" if exc.problem_mark else str(path)
        raise ConfigurationError(f"{where}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # An integer of thousands of digits (int() refuses it), or nesting deeper than Python's stack.
        raise ConfigurationError(f"{path}: not usable YAML ({type(exc).__name__})") from None
    root, doc = document.root, document.value
    if doc is None:
        doc = {"rules": []}
    rules_node = _rules_node(root)
    lines = {i: item.start_mark.line + 1 for i, item in enumerate(rules_node.value)} if rules_node else {}
    errors = _schema_errors(doc)
    if errors:
        err = errors[0]
        path_parts = list(err.absolute_path)
        where = str(path)
        if len(path_parts) >= 2 and path_parts[0] == "rules" and isinstance(path_parts[1], int):
            line = lines.get(path_parts[1])
            rules = doc.get("rules") if isinstance(doc, dict) else None
            name = (
                rules[path_parts[1]].get("name")
                if isinstance(rules, list) and isinstance(rules[path_parts[1]], dict)
                else None
            )
            where = f"{path}:{line}" if line else where
            if name:
                where += f": rule {name!r}"
            field = ".".join(str(p) for p in path_parts[2:])
            if field:
                where += f": {field}"
        raise ConfigurationError(f"{where}: {err.message}")
    for i, rule in enumerate(doc.get("rules", [])):
        rule["__line__"] = lines.get(i)
    result: dict[str, Any] = doc
    return result


@contextmanager
def collection_paused() -> Iterator[None]:
    """Automatic garbage collection off while policies are read and compiled; back on after, if it
    was on before (also when a file is refused).

    Reading builds hundreds of thousands of small objects (YAML nodes and their marks, then
    rules).  Each allocation threshold crossed started a collection that walked every live
    object again; at 10,000 rules in one file more than half of the load went on those walks
    (perf: ``gc_collect_main``, ``visit_reachable``, ``visit_decref``).  Only the automatic
    trigger stops (https://docs.python.org/3/library/gc.html#gc.disable): objects freed by
    reference counting go at once as always, and any cyclic garbage made meanwhile is
    collected by the next collection after.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def policy_files(directory: Path) -> list[Path]:
    """``*.yaml`` and ``*.yml`` directly in ``directory``, in name order (subdirectories are not read)."""
    if not directory.is_dir():
        raise ConfigurationError(f"policies directory {directory} does not exist")
    return sorted(p for p in directory.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())


def names_used(paths: Iterable[Path]) -> tuple[frozenset[str], frozenset[str]]:
    """The issuer and client names that the rules of ``paths`` refer to (files checked as they are read).

    For ``sts policy check --standalone``: files written for another configuration are
    compiled against the names they use, so that everything else in them is checked.
    """
    issuers: set[str] = set()
    clients: set[str] = set()
    with collection_paused():
        for path in paths:
            for rule in read_policy_file(path).get("rules", []):
                issuers.add(rule["issuer"])
                issuers.update(actor["issuer"] for actor in rule.get("delegation", {}).get("actors", ()))
                clients.update(rule.get("clients", ()))
    return frozenset(issuers), frozenset(clients)


def load_policies(
    paths: Iterable[Path],
    *,
    issuers: frozenset[str],
    clients: frozenset[str],
    max_lifetime: int,
    default_lifetime: int = 300,
    texts: PolicySources | None = None,
) -> PolicySet:
    """Compile the policy files ``paths`` or, given ``texts``, those texts (``paths`` unused)."""
    sources = texts if texts is not None else tuple((path, None) for path in paths)
    with collection_paused():
        documents = []
        for path, text in sources:
            doc = read_policy_file(path, text)
            for rule in doc.get("rules", []):
                line = rule.pop("__line__", None)
                rule.setdefault("__source__", f"{path}:{line}" if line else str(path))
            documents.append((str(path), doc))
        return compile_policy(
            documents,
            issuers=issuers,
            clients=clients,
            max_lifetime=max_lifetime,
            default_lifetime=default_lifetime,
        )
