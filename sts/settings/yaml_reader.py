"""Reading YAML strictly: a duplicate key is refused, and aliases may not stand for too much.

Shared by the two kinds of file an operator writes, the configuration file
(:mod:`sts.settings.load`) and the policy files (:mod:`sts.adapters.policy_files`),
so that both refuse what either refuses.  PyYAML's ``safe_load`` keeps the last of
two equal keys of a mapping without a word, though YAML 1.2.2 §3.2.1.1 requires
mapping keys to be unique: ``require_jti: true`` followed by ``require_jti: false``
in one issuer turned the check off, and a second top-level ``trusted_proxies``
pasted further down replaced the first (an outside audit; policy files already
refused it).  Lives with the settings (a floor below the adapters) so that both
readers may import it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml

#: libyaml's parser when PyYAML was built with it (it is, in the wheels), else the pure-Python one.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: The most values a document may stand for once its YAML aliases are expanded: a few hundred
#: bytes of nested aliases stand for billions (an outside audit had a 557-byte policy file take
#: 40 s and 4 GB to refuse, in the schema check's error message); 10,000 rules are about 300,000.
MAX_EXPANDED_NODES = 2_000_000


class UniqueKeyLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """A safe loader that refuses duplicate keys (YAML would silently keep the last)."""


class DuplicateKey(Exception):
    """A mapping names ``key`` twice; ``line`` (1-based) is the second one's.  ``root`` is the
    document's node tree, for a reader that says more about where the line is."""

    def __init__(self, line: int, key: Any) -> None:
        super().__init__(f"line {line}: duplicate key {key!r}")
        self.line = line
        self.key = key
        self.root: yaml.Node | None = None


class AliasesTooLarge(Exception):
    """The document's aliases expand to more than :data:`MAX_EXPANDED_NODES` values."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """The mapping, refusing a key the mapping itself names twice.  Merge keys (``<<: *base``, as
    ``safe_load`` reads them) are resolved first, and a key named in the mapping overrides a
    merged one, as YAML's merge key type says: that is no duplicate (an outside re-check: a
    configuration file sharing an issuer's fields by ``<<`` stopped loading)."""
    own: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found an unhashable key",
                key_node.start_mark,
            )
        if key in own:
            raise DuplicateKey(key_node.start_mark.line + 1, key)
        own.add(key)
    loader.flatten_mapping(node)  # the merged pairs first, then the mapping's own
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        mapping[loader.construct_object(key_node, deep=deep)] = loader.construct_object(value_node, deep=deep)
    return mapping


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def expanded_size(root: yaml.Node) -> int:
    """How many nodes ``root`` stands for with its aliases expanded (an alias is the node it names,
    so shared nodes are counted once per use; each distinct node is looked at once)."""
    sizes: dict[int, int] = {}
    order: list[yaml.Node] = []
    stack: list[yaml.Node] = [root]
    while stack:  # every distinct node, parents before children
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = 1
        order.append(node)
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)
    for node in reversed(order):  # children first
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            continue
        sizes[id(node)] = min(1 + sum(sizes[id(child)] for child in children), MAX_EXPANDED_NODES + 1)
    return sizes[id(root)]


@dataclass(frozen=True)
class YamlDocument:
    """One document read: its node tree (for line numbers) and the values it holds."""

    root: yaml.Node | None
    value: Any


def read_yaml(text: str) -> YamlDocument:
    """The single document of ``text``, composed into a node tree once and constructed from it.

    Raises :class:`DuplicateKey` (with the tree), :class:`AliasesTooLarge`, PyYAML's
    :class:`yaml.YAMLError`, and ``ValueError`` or ``RecursionError`` (an integer of thousands
    of digits, nesting deeper than Python's stack): each reader says which file it was.
    """
    loader = UniqueKeyLoader(text)
    root: yaml.Node | None = None
    try:
        root = loader.get_single_node()
        if root is not None and "*" in text and expanded_size(root) > MAX_EXPANDED_NODES:
            raise AliasesTooLarge(
                f"YAML aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias bomb?)"
            )
        return YamlDocument(root, loader.construct_document(root) if root is not None else None)
    except DuplicateKey as exc:
        exc.root = root
        raise
    finally:
        loader.dispose()
