"""Per-request trace context, pipeline stage timing, and optional OpenTelemetry spans.

Every request gets a :class:`RequestTrace` (started by :mod:`sts.http.tracing`):
its W3C trace id comes from a valid incoming ``traceparent``, else a new trace
starts.  The trace id goes into the logs (:mod:`sts.adapters.log_format`) and
the audit record; :func:`outbound_headers` passes the trace on to the calls
this service makes while serving the request (JWKS fetches, TokenReview).

:class:`Tracing` is also the pipeline's :class:`~sts.core.ports.PipelineStages`:
each stage the pipeline enters ends the one before (one reading of the clock
marks both), and the last ends with the request.  Every stage is

* reported when the request ends, all of them together, to each *stages
  observer*, ``observer(route, [(stage, seconds), ...])`` (the per-stage
  latency histograms plug in here with :meth:`Tracing.add_stages_observer`,
  and count a request's stages in one go), and to each *observer*,
  ``observer(route, stage, seconds)`` (:meth:`Tracing.add_observer`), and
* with OpenTelemetry switched on (setting ``tracing``, the ``otel`` extra), a
  span, child of the request's server span, itself child of the caller's span,
  which ends as the stage does.

The decision core never imports OpenTelemetry; only this module does, and
only when tracing is on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from operator import sub
from typing import Any

from ..errors import ConfigurationError
from ..protocol.trace_context import TraceContext, new_span_id, new_trace_id
from ..settings import TracingSettings

#: ``observer(route, stage, seconds)``, called for each pipeline stage as the request ends.
StageObserver = Callable[[str, str, float], None]
#: ``observer(route, [(stage, seconds), ...])``: a request's stages in order, as the request ends.
StagesObserver = Callable[[str, Sequence[tuple[str, float]]], None]

#: The request being served by this thread (or task), if any.
current: ContextVar[RequestTrace | None] = ContextVar("sts_request_trace", default=None)


class RequestTrace:
    """One request: its id, its place in the trace, and the stages its pipeline has entered.

    A plain class with slots: one is made per request.  Its :class:`TraceContext` is made when
    first asked for (an outbound call, a span), from the ids the request's logs and record carry.
    """

    __slots__ = (
        "_context",
        "finished",
        "flags",
        "previous",
        "request_id",
        "route",
        "span",
        "span_id",
        "stage_context",
        "stage_span",
        "stages",
        "trace_id",
    )

    def __init__(
        self,
        request_id: str,
        route: str,
        trace_id: str,
        span_id: str,
        flags: int = 0,
        *,
        span: Any = None,
        context: TraceContext | None = None,
    ) -> None:
        self.request_id = request_id
        self.route = route
        self.trace_id = trace_id
        #: This service's span of the trace: the parent of whatever it calls.
        self.span_id = span_id
        self.flags = flags
        self._context = context
        self.span = span
        #: The stages entered, in order, each with the clock's reading as it was entered.
        self.stages: list[tuple[str, float]] = []
        self.stage_span: Any = None
        self.stage_context: TraceContext | None = None
        #: The request this one started inside of (a nested call in tests), restored when it ends.
        self.previous: RequestTrace | None = None
        self.finished = False

    @property
    def context(self) -> TraceContext:
        """This service's place in the trace: the parent of whatever it calls."""
        if self._context is None:
            self._context = TraceContext(self.trace_id, self.span_id, self.flags)
        return self._context

    @property
    def stage(self) -> str | None:
        """The stage the request is in (None before the first and once the request has ended)."""
        return self.stages[-1][0] if self.stages and not self.finished else None

    def outbound(self) -> TraceContext:
        """The context an outbound call continues: the current stage's span, else the request's."""
        return self.stage_context or self.context


def outbound_headers() -> dict[str, str]:
    """``traceparent`` for an outbound HTTP call made while serving a request; ``{}`` otherwise."""
    trace = current.get()
    if trace is None:
        return {}
    return {"traceparent": trace.outbound().traceparent()}


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add attributes (decision, rule, reason) to the current request's span, if it has one."""
    trace = current.get()
    if trace is not None and trace.span is not None:
        trace.span.set_attributes({k: v for k, v in attributes.items() if v is not None})


class Tracing:
    """Starts and ends request traces; times the pipeline's stages (ports.PipelineStages)."""

    def __init__(
        self, tracer: Any = None, *, provider: Any = None, timer: Callable[[], float] = time.perf_counter
    ) -> None:
        #: An OpenTelemetry ``Tracer`` (and its SDK ``TracerProvider``) when tracing is on, else None.
        self.tracer = tracer
        self.provider = provider
        self.timer = timer
        self.observers: list[StageObserver] = []
        self.stages_observers: list[StagesObserver] = []

    def flush(self, timeout_millis: int = 5000) -> bool:
        """Export the spans still queued (the SDK also does so at exit); True when all went."""
        return bool(self.provider.force_flush(timeout_millis)) if self.provider is not None else True

    def add_observer(self, observer: StageObserver) -> None:
        self.observers.append(observer)

    def add_stages_observer(self, observer: StagesObserver) -> None:
        self.stages_observers.append(observer)

    # -- requests ------------------------------------------------------------------------------

    def start_request(
        self, request_id: str, method: str, route: str, incoming: TraceContext | None
    ) -> RequestTrace:
        """Begin serving a request, continuing ``incoming`` when the caller sent a valid one."""
        if self.tracer is not None:
            span, context = self._start_server_span(method, route, request_id, incoming)
            trace = RequestTrace(
                request_id,
                route,
                context.trace_id,
                context.span_id,
                context.flags,
                span=span,
                context=context,
            )
        elif incoming is not None:
            # This service's span of the caller's trace (TraceContext.child, made when needed).
            trace = RequestTrace(request_id, route, incoming.trace_id, new_span_id(), incoming.flags)
        else:
            trace = RequestTrace(request_id, route, new_trace_id(), new_span_id())  # as new_trace()
        trace.previous = current.get()
        current.set(trace)
        return trace

    def finish_request(self, trace: RequestTrace, status: int | None) -> None:
        """End the last stage and the request (its span records the status)."""
        if trace.stages and not trace.finished:
            now = self.timer()
            if trace.stage_span is not None:
                self._end_stage_span(trace)
            if self.stages_observers or self.observers:
                self._report_stages(trace, now)
        if trace.span is not None:
            _finish_server_span(trace.span, status)
            trace.span = None
        trace.finished = True
        if current.get() is trace:
            # Back to the request this one was nested in, if that one is still going.  (A request
            # that ends while a nested one is current leaves it be: the nested one ends later.)
            previous = trace.previous
            current.set(previous if previous is not None and not previous.finished else None)
        trace.previous = None

    # -- ports.PipelineStages ------------------------------------------------------------------

    def enter(self, stage: str) -> None:
        trace = current.get()
        if trace is None:
            return
        # One reading of the clock ends the stage before and starts this one.
        trace.stages.append((stage, self.timer()))
        if self.tracer is not None and trace.span is not None:
            if trace.stage_span is not None:
                self._end_stage_span(trace)
            trace.stage_span, trace.stage_context = _start_child_span(self.tracer, trace.span, stage)

    @staticmethod
    def _end_stage_span(trace: RequestTrace) -> None:
        trace.stage_span.end()
        trace.stage_span, trace.stage_context = None, None

    def _report_stages(self, trace: RequestTrace, now: float) -> None:
        """Each stage's time, from its start to the next one's (the last: to ``now``)."""
        names, starts = zip(*trace.stages, strict=True)
        timings = list(zip(names, map(sub, (*starts[1:], now), starts), strict=True))
        route = trace.route
        for observe_stages in self.stages_observers:
            observe_stages(route, timings)
        for observe in self.observers:
            for stage, seconds in timings:
                observe(route, stage, seconds)

    def _start_server_span(
        self, method: str, route: str, request_id: str, incoming: TraceContext | None
    ) -> tuple[Any, TraceContext]:
        from opentelemetry.context import Context
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            TraceFlags,
            set_span_in_context,
        )

        parent = Context()  # A root span unless the caller sent a trace: never an ambient one.
        if incoming is not None:
            remote = SpanContext(
                trace_id=int(incoming.trace_id, 16),
                span_id=int(incoming.span_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(incoming.flags & 0xFF),
            )
            parent = set_span_in_context(NonRecordingSpan(remote))
        span = self.tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route, "sts.request_id": request_id},
        )
        return span, _context_of(span)


def _context_of(span: Any) -> TraceContext:
    ctx = span.get_span_context()
    return TraceContext(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", int(ctx.trace_flags))


def _start_child_span(tracer: Any, parent: Any, name: str) -> tuple[Any, TraceContext]:
    from opentelemetry.trace import set_span_in_context

    span = tracer.start_span(name, context=set_span_in_context(parent))
    return span, _context_of(span)


def _finish_server_span(span: Any, status: int | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if status is not None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            # Server spans: only 5xx is an error (OpenTelemetry HTTP semantic conventions).
            span.set_status(Status(StatusCode.ERROR))
    else:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def build_tracing(settings: TracingSettings, *, span_exporter: Any = None) -> Tracing:
    """Tracing as configured: stage timing always; OpenTelemetry spans when ``enabled``.

    ``span_exporter`` (tests) replaces the configured exporter and exports each span as it ends.
    """
    if not settings.enabled:
        return Tracing()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise ConfigurationError(
            "setting tracing.enabled: OpenTelemetry is not installed (pip install 'workload-sts[otel]')"
        ) from None
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        # Follow the caller's sampling decision; sample new traces at the configured ratio.
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif settings.exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigurationError(
                "setting tracing.exporter: the OTLP exporter is not installed "
                "(pip install 'workload-sts[otel]')"
            ) from None
        exporter = OTLPSpanExporter(endpoint=settings.endpoint) if settings.endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider.get_tracer("sts"), provider=provider)
