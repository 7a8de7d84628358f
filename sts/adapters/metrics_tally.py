"""The request path's metric values, kept as plain numbers and handed to ``prometheus_client`` in bulk.

A token exchange makes about twenty observations (the request's latency and status, eight pipeline
stages, its decision), and ``prometheus_client`` takes a lock, and in multiprocess mode checks the
process id and writes the file, for each of them.  Here a request's observations are added up in
one list of plain floats (one *slot* per value: a counter's, a histogram's sum and each of its
buckets), under one lock per batch (a request's stages come in one batch).  They reach the values
``prometheus_client`` exposes:

* in one process (a registry of its own), when scraped: :class:`Tally` is registered in the registry
  before the metrics it feeds, so that collecting the registry first sets each value to its slot's
  total (:meth:`Tally.collect`); the families, labels, bucket bounds and ``_created`` times are
  ``prometheus_client``'s own;
* in multiprocess mode (several worker processes, :mod:`sts.adapters.metrics_exposition`), before
  the batch's lock is released: each slot's total is written where ``prometheus_client`` keeps the
  value in this process's file (:meth:`MmapedDict.write_value` does the same), so the listener
  reads, at any time, every request that has been counted.

The totals replace the values: a value in a slot is only ever changed through its tally.  The test
of :mod:`sts.adapters.metrics` compares both ways with ``prometheus_client``'s own ``observe`` and
``inc``, so a change of the internals read here (``MmapedValue._file``, ``_key``, ``_value``,
``MmapedDict._positions``, ``_m``) shows.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

#: How ``prometheus_client.mmap_dict`` stores a value: the value, then its timestamp (0: none).
_TWO_DOUBLES = struct.Struct("dd").pack

#: A batch of observations: slot, amount, slot, amount, ...
Batch = Sequence[Any]


class Tally(Collector):
    """Plain totals for a set of ``prometheus_client`` values (``MutexValue``, or ``MmapedValue``
    in multiprocess mode), one slot each, added to in batches under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: list[float] = []
        self.values: list[Any] = []
        #: What each value showed when last set from its slot (one process).
        self._shown: list[float] = []
        #: Multiprocess mode: per slot, the value's file (``MmapedDict``) and its place in it.
        self._places: list[tuple[Any, int]] = []
        self._pid = os.getpid()
        self.write_through = False

    def slots(self, values: Sequence[Any]) -> int:
        """Give ``values`` consecutive slots, starting from what they hold now; return the first."""
        with self.lock:
            first = len(self.totals)
            for value in values:
                # Every value of a process is of the class prometheus_client chose for it.
                self.write_through = bool(getattr(value, "_multiprocess", False))
                self.values.append(value)
                self.totals.append(value.get())
                self._shown.append(self.totals[-1])
                if self.write_through:
                    self._places.append(_place_of(value))
            return first

    def add(self, batch: Batch) -> None:
        """Add ``amount`` to each ``slot`` of ``batch`` (``slot, amount, slot, amount, ...``)."""
        with self.lock:
            if self.write_through and os.getpid() != self._pid:
                self._after_fork()
            totals = self.totals
            for i in range(0, len(batch), 2):
                totals[batch[i]] += batch[i + 1]
            if self.write_through:
                self._write(batch)

    def _write(self, batch: Batch) -> None:
        """Multiprocess mode: the batch's slots, written to this process's files (lock held)."""
        totals, values, places = self.totals, self.values, self._places
        for i in range(0, len(batch), 2):
            slot = batch[i]
            total = totals[slot]
            values[slot]._value = total
            file, position = places[slot]
            file._m[position : position + 16] = _TWO_DOUBLES(total, 0.0)

    def _after_fork(self) -> None:
        """A forked process starts from the values in its own files, as ``prometheus_client`` does
        (reading any value makes it reopen them)."""
        self._pid = os.getpid()
        for slot, value in enumerate(self.values):
            self.totals[slot] = value.get()
            self._places[slot] = _place_of(value)

    # -- one process: the values are set when the registry is collected --------------------------

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """Set each value that changed to its slot's total; no family of its own."""
        if not self.write_through:
            with self.lock:
                shown = self._shown
                for slot, total in enumerate(self.totals):
                    if total != shown[slot]:
                        self.values[slot].set(total)
                        shown[slot] = total
        return iter(())


def _place_of(value: Any) -> tuple[Any, int]:
    """Where ``prometheus_client`` keeps ``value`` (an ``MmapedValue``) in this process's file."""
    file = value._file
    return file, file._positions[value._key]  # placed when the value was made
