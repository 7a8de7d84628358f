"""Reading policy files: YAML with line numbers, checked against the published JSON Schema.

Compilation itself is pure and lives in :mod:`sts.core.policy`; this module
only reads files and reports errors as ``file:line: rule 'name': reason``.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ..core.policy import PolicySet, compile_policy
from ..errors import ConfigurationError


def policy_schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files("sts.schemas").joinpath("policy.schema.json").read_text("utf-8")
    )
    return loaded


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (YAML would silently keep the last)."""


class _DuplicateKey(Exception):
    def __init__(self, line: int, key: Any) -> None:
        super().__init__(f"line {line}: duplicate key {key!r}")
        self.line = line
        self.key = key


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found an unhashable key",
                key_node.start_mark,
            )
        if key in mapping:
            raise _DuplicateKey(key_node.start_mark.line + 1, key)
        mapping[key] = loader.construct_object(value_node, deep=deep)  # type: ignore[no-untyped-call]
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _rule_lines(text: str) -> dict[int, int]:
    """Line number (1-based) of each rule in the ``rules`` list, by index."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(root, yaml.MappingNode):
        return {}
    for key, value in root.value:
        if key.value == "rules" and isinstance(value, yaml.SequenceNode):
            return {i: item.start_mark.line + 1 for i, item in enumerate(value.value)}
    return {}


def _rule_containing(text: str, line: int) -> str:
    """``: rule 'name'`` for the rule whose YAML spans ``line`` (1-based), else an empty string."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return ""
    if not isinstance(root, yaml.MappingNode):
        return ""
    for key, value in root.value:
        if key.value != "rules" or not isinstance(value, yaml.SequenceNode):
            continue
        for item in value.value:
            if not item.start_mark.line + 1 <= line <= item.end_mark.line + 1:
                continue
            if isinstance(item, yaml.MappingNode):
                for k, v in item.value:
                    if k.value == "name" and isinstance(v, yaml.ScalarNode):
                        return f": rule {v.value!r}"
    return ""


def read_policy_file(path: Path) -> dict[str, Any]:
    """Parse and schema-check one file; errors name the file, line and rule."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigurationError(
            f"{path}:{exc.line}{_rule_containing(text, exc.line)}: duplicate key {exc.key!r} "
            "(YAML would silently keep the last value)"
        ) from None
    except yaml.MarkedYAMLError as exc:
        where = f"{path}:{exc.problem_mark.line + 1}" if exc.problem_mark else str(path)
        raise ConfigurationError(f"{where}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from None
    if doc is None:
        doc = {"rules": []}
    # YAML keys need not be strings (``1: x``, ``null: x``): compare list indexes as numbers and
    # everything else as text, so that sorting never compares an int with a str.
    errors = sorted(
        jsonschema.Draft202012Validator(policy_schema()).iter_errors(doc),
        key=lambda e: [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in e.path],
    )
    if errors:
        err = errors[0]
        path_parts = list(err.absolute_path)
        where = str(path)
        if len(path_parts) >= 2 and path_parts[0] == "rules" and isinstance(path_parts[1], int):
            line = _rule_lines(text).get(path_parts[1])
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
        rule["__line__"] = _rule_lines(text).get(i)
    result: dict[str, Any] = doc
    return result


def policy_files(directory: Path) -> list[Path]:
    """``*.yaml`` and ``*.yml`` directly in ``directory``, in name order (subdirectories are not read)."""
    if not directory.is_dir():
        raise ConfigurationError(f"policies directory {directory} does not exist")
    return sorted(p for p in directory.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())


def load_policies(
    paths: Iterable[Path],
    *,
    issuers: frozenset[str],
    clients: frozenset[str],
    max_lifetime: int,
    default_lifetime: int = 300,
) -> PolicySet:
    documents = []
    for path in paths:
        doc = read_policy_file(path)
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
