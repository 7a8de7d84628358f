"""Reading policies pauses automatic garbage collection, and always gives it back.

At 10,000 rules in one file, collections started by the allocation threshold walked every
live object again and again and took two thirds of the load time.  These tests pin the
pause itself (not a timing): with the threshold at its lowest, reading a policy outside the
pause starts collections, reading it through ``load_policies`` starts none, and whatever the
collector's state was before a load, success or failure, it is the same after.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sts.adapters.policy_files import collection_paused, load_policies, names_used, read_policy_file
from sts.errors import ConfigurationError


def _write(directory: Path, rules: int) -> Path:
    doc = {
        "version": 1,
        "rules": [
            {
                "name": f"r{i}",
                "issuer": "upstream",
                "subject": f"repo:acme/app{i}:ref:refs/heads/main",
                "grant": {"audiences": ["https://deploy.example.com"], "scopes": ["deploy:read"]},
            }
            for i in range(rules)
        ],
    }
    path = directory / "all.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


#: The functions that read and compile: a collection started under one of them is what the pause stops.
_LOADING = frozenset({"read_policy_file", "compile_policy"})


def _while_loading() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in _LOADING:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """Generations of the collections started while a policy was read or compiled, at a threshold of 1.

    Collections started elsewhere (building the arguments, raising the error) are not counted:
    with a threshold of 1 allocation they happen on almost any line.
    """
    started: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and _while_loading():
            started.append(info["generation"])

    threshold = gc.get_threshold()
    was_enabled = gc.isenabled()
    gc.enable()
    gc.set_threshold(1)
    gc.callbacks.append(record)
    try:
        yield started
    finally:
        gc.callbacks.remove(record)
        gc.set_threshold(*threshold)
        if not was_enabled:
            gc.disable()


def _load(path: Path) -> None:
    load_policies([path], issuers=frozenset({"upstream"}), clients=frozenset(), max_lifetime=3600)


def test_reading_without_the_pause_starts_collections(tmp_path: Path, collections: list[int]) -> None:
    """The control: the same read, outside the pause, is what the threshold triggers on."""
    path = _write(tmp_path, 50)
    collections.clear()
    read_policy_file(path)
    assert collections, "a threshold of 1 must start collections while a policy is read"


def test_loading_starts_no_collection(tmp_path: Path, collections: list[int]) -> None:
    path = _write(tmp_path, 50)
    collections.clear()
    _load(path)
    names_used([path])
    assert collections == []
    assert gc.isenabled()


def test_a_refused_policy_gives_collection_back(tmp_path: Path, collections: list[int]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nrules:\n  - name: a\n    name: b\n")
    collections.clear()
    with pytest.raises(ConfigurationError, match="duplicate key"):
        _load(path)
    assert gc.isenabled()
    assert collections == []


def test_a_collector_switched_off_before_stays_off(tmp_path: Path) -> None:
    path = _write(tmp_path, 3)
    gc.disable()
    try:
        _load(path)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_nested_pauses_restore_the_outer_state() -> None:
    assert gc.isenabled()
    with collection_paused():
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
