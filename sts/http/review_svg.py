"""Geometry of the review page's charts and graph, drawn as inline SVG by its templates.

Plain functions from numbers to shapes (rectangles, paths, labels), so the page
needs no script and no outside asset: the templates only place what is computed
here, and Jinja escapes every label.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..core.audit_views import Bucket, Edge

OUTCOME_ORDER = ("granted", "refused", "error")


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "middle"
    css: str = "axis"
    title: str = ""


@dataclass(frozen=True)
class Path:
    d: str
    css: str
    title: str


@dataclass(frozen=True)
class Figure:
    width: float
    height: float
    rects: list[Rect] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    lines: list[tuple[float, float, float, float]] = field(default_factory=list)


def _nice_step(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return float(next(step * power for step in (1, 2, 5, 10) if value <= step * power))


def _clock(epoch: float, step: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, tz=dt.UTC)
    return moment.strftime("%m-%d" if step >= 86400 else "%m-%d %H:%M")


def shorten(text: str, limit: int = 44) -> str:
    """Keep the end of a long name (the distinguishing part of a subject or URL)."""
    return text if len(text) <= limit else "\N{HORIZONTAL ELLIPSIS}" + text[-(limit - 1) :]


def outcome_chart(buckets: Sequence[Bucket], *, width: float = 760, height: float = 240) -> Figure:
    """Stacked bars of decisions per bucket, one colour per outcome, with a y axis."""
    left, right, top, bottom = 56.0, 40.0, 12.0, 40.0
    figure = Figure(width, height)
    plot_w, plot_h = width - left - right, height - top - bottom
    # Four grid steps of a round size: 0, 2, 4, 6, 8 rather than 0, 1.25, 2.5...
    peak = 4 * _nice_step(max((b.total for b in buckets), default=0) / 4)
    for i in range(5):
        value = peak * i / 4
        y = top + plot_h - plot_h * i / 4
        figure.lines.append((left, y, width - right, y))
        figure.labels.append(Label(left - 6, y + 4, f"{value:,.0f}", "end"))
    if not buckets:
        return figure
    slot = plot_w / len(buckets)
    step = buckets[0].end - buckets[0].start
    every = max(1, math.ceil(len(buckets) / 8))
    for i, bucket in enumerate(buckets):
        x = left + i * slot
        y = top + plot_h
        for outcome in OUTCOME_ORDER:
            count = bucket.counts.get(outcome, 0)
            if not count:
                continue
            h = plot_h * count / peak
            y -= h
            title = f"{_clock(bucket.start, step)} UTC: {count:,} {outcome}"
            figure.rects.append(Rect(x + slot * 0.1, y, max(1.0, slot * 0.8), h, outcome, title))
        if i % every == 0:
            figure.labels.append(Label(x + slot / 2, height - bottom + 16, _clock(bucket.start, step)))
    return figure


def signal_chart(top: Sequence[tuple[str, int]], *, width: float = 760) -> Figure:
    """Horizontal bars: how often each risk signal fired."""
    row, left, right = 26.0, 170.0, 70.0
    figure = Figure(width, max(row, row * len(top)) + 8)
    peak = max((n for _, n in top), default=0) or 1
    for i, (name, count) in enumerate(top):
        y = 4 + i * row
        w = (width - left - right) * count / peak
        figure.rects.append(Rect(left, y, max(1.0, w), row - 8, "signal", f"{name}: fired {count:,} times"))
        figure.labels.append(Label(left - 8, y + row / 2, name, "end", "name"))
        figure.labels.append(Label(left + w + 6, y + row / 2, f"{count:,}", "start", "value"))
    return figure


def _node(issuer: str | None, subject: str | None) -> str:
    return f"{issuer or '?'} / {subject or '?'}"


def edge_graph(edges: Sequence[Edge], *, width: float = 1040, label: int = 60) -> Figure:
    """A two-column graph: subjects on the left, audiences on the right, one curve per edge.

    Audiences are ordered by the mean position of the subjects that reach them, which
    keeps most curves short; new edges carry the ``new`` class (drawn red and dashed)
    and a "new" mark by their audience.
    """
    row, top = 24.0, 16.0
    subjects = sorted({_node(e.issuer, e.subject) for e in edges})
    position = {name: i for i, name in enumerate(subjects)}
    reached: dict[str, list[int]] = {}
    for e in edges:
        reached.setdefault(e.audience, []).append(position[_node(e.issuer, e.subject)])
    audiences = sorted(reached, key=lambda a: (sum(reached[a]) / len(reached[a]), a))
    slot = {name: i for i, name in enumerate(audiences)}
    rows = max(len(subjects), len(audiences), 1)
    figure = Figure(width, top * 2 + rows * row)
    x_left, x_right = width * 0.4, width * 0.6

    def y_of(index: int, count: int) -> float:
        # Centre the shorter column against the taller one.
        return top + (rows - count) * row / 2 + index * row + row / 2

    for name in subjects:
        y = y_of(position[name], len(subjects))
        figure.labels.append(Label(x_left - 10, y + 4, shorten(name, label), "end", "node", name))
        figure.rects.append(Rect(x_left - 4, y - 4, 8, 8, "node", name))
    new_audiences = {e.audience for e in edges if e.new}
    for name in audiences:
        y = y_of(slot[name], len(audiences))
        figure.labels.append(Label(x_right + 10, y + 4, shorten(name, label), "start", "node", name))
        figure.rects.append(Rect(x_right - 4, y - 4, 8, 8, "node", name))
        if name in new_audiences:
            figure.labels.append(
                Label(x_right + 14 + 6.2 * len(shorten(name, label)), y + 4, "new", "start", "new-mark")
            )
    for e in edges:
        y1 = y_of(position[_node(e.issuer, e.subject)], len(subjects))
        y2 = y_of(slot[e.audience], len(audiences))
        mid = (x_left + x_right) / 2
        d = f"M {x_left + 4:.1f} {y1:.1f} C {mid:.1f} {y1:.1f}, {mid:.1f} {y2:.1f}, "
        d += f"{x_right - 4:.1f} {y2:.1f}"
        first = dt.datetime.fromtimestamp(e.first_seen, tz=dt.UTC).strftime("%Y-%m-%d %H:%M")
        title = f"{_node(e.issuer, e.subject)} \N{RIGHTWARDS ARROW} {e.audience}: "
        title += f"{e.decisions:,} grants, first {first} UTC"
        figure.paths.append(Path(d, "edge new" if e.new else "edge", ("NEW " if e.new else "") + title))
    return figure
