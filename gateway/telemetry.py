"""OpenTelemetry traces: one trace per task, optional (``pip install 'tenebra[otel]'``).

On only where the standard variables ask for an exporter (``OTEL_TRACES_EXPORTER`` other than
``none``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), the
packages import, and ``OTEL_SDK_DISABLED`` is not ``true``: :func:`from_env` decides once, at
start. Off, there is no :class:`Telemetry` at all, and the task path does no work for it: the
registry's ``moved`` hook stays None, the doors and the intake test one attribute for None.

A task's trace (spans named as here; times from the frame or request that brought it):

- ``task`` (root; SERVER): from its frame's arrival to its end; tenant, key id, taskUUID, model,
  numberResults; at the end its state, images, cost, error code (status ERROR unless done).
  Its parent is the ``traceparent`` of the REST request, or of the WebSocket upgrade request
  (every task of that socket), when there is one: the client's trace is continued.
- ``intake``: the frame's arrival to the task handed on (decoding, validation, limits, claim).
- ``queued``: waiting at the gateway for provider capacity (again after a provider refusal).
- ``provider``: sent to the provider until it ends there; a child per result,
  ``provider.first_result`` then ``provider.result``, each from the send to that result.
- ``delivery.attempt`` (CLIENT): each webhook POST or upload PUT, a child of ``task`` even
  after the task ended (found by the ``traceparent`` kept on its record: on the replica that
  takes a task over too), with the response status.

The variables are the SDK's own: ``OTEL_SERVICE_NAME`` (default ``tenebra``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_EXPORTER_OTLP_*``
(``OTEL_EXPORTER_OTLP_PROTOCOL`` ``http/protobuf``, the default, or ``grpc``), ``OTEL_BSP_*``;
``OTEL_TRACES_EXPORTER`` takes ``otlp`` and ``console``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from gateway.store.base import TaskRecord, TaskState

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, TracerProvider

    from gateway.delivery.deliveries import Deliveries
    from gateway.tasks import TaskRegistry

__all__ = ["FrameTrace", "Telemetry", "from_env"]

log = structlog.get_logger("tenebra.telemetry")

S = TaskState
_FINAL = frozenset({S.DONE, S.FAILED, S.EXPIRED})


class FrameTrace:
    """What the door knows of a frame (a request) for its tasks' traces: the client's trace
    context, if it sent one, and when the frame arrived (ns since the epoch)."""

    __slots__ = ("parent", "start")

    def __init__(self, parent: Context | None, start: int) -> None:
        self.parent = parent
        self.start = start


class _Spans:
    """One open task's spans."""

    __slots__ = ("context", "phase", "provider", "provider_context", "root", "sent")

    def __init__(self, root: Span, context: Context, phase: Span | None) -> None:
        self.root = root
        self.context = context  # the root's, for its children
        self.phase: Span | None = phase  # intake, queued or provider: the one running now
        self.provider: Span | None = None
        self.provider_context: Context | None = None
        self.sent = 0


class Telemetry:
    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("tenebra")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._open: dict[str, _Spans] = {}  # by upstream UUID: open tasks only

    # ------------------------------------------------------------------ the doors

    def extract(self, headers: Mapping[str, str]) -> Context | None:
        """The W3C trace context of a request's headers, or None."""
        if "traceparent" not in headers:
            return None
        return self._propagator.extract(headers)

    @staticmethod
    def frame(parent: Context | None, start: int | None = None) -> FrameTrace:
        return FrameTrace(parent, time.time_ns() if start is None else start)

    # ------------------------------------------------------------------ a task's spans

    def begin(self, record: TaskRecord, frame: FrameTrace | None) -> None:
        """A task registered by the intake (before it is handed on)."""
        start = frame.start if frame is not None else time.time_ns()
        spans = self._root(record, frame.parent if frame is not None else None, start)
        spans.phase = self.tracer.start_span("intake", spans.context, start_time=start)

    def _root(self, record: TaskRecord, parent: Context | None, start: int) -> _Spans:
        task = record.task
        root = self.tracer.start_span(
            "task",
            parent,
            kind=self._trace.SpanKind.SERVER,
            start_time=start,
            attributes={
                "tenebra.tenant": record.tenant,
                "tenebra.key_id": record.key_id or "",
                "tenebra.task_uuid": task.taskUUID,
                "tenebra.upstream_uuid": record.upstream_uuid,
                "tenebra.model": task.model,
                "tenebra.number_results": task.numberResults,
                "tenebra.delivery_method": task.deliveryMethod,
            },
        )
        context = root.get_span_context()
        record.trace = (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        )
        spans = self._open[record.upstream_uuid] = _Spans(
            root, self._trace.set_span_in_context(root), None
        )
        return spans

    def moved(self, record: TaskRecord, state: TaskState) -> None:
        """``registry.moved``: the phase spans follow the lifecycle."""
        spans = self._open.get(record.upstream_uuid)
        if spans is None:  # a task taken over from another replica: its trace goes on here
            parent = self._parent(record.trace)
            spans = self._root(record, parent, time.time_ns())
        now = time.time_ns()
        tracer = self.tracer
        if state is S.QUEUED:
            self._end_phase(spans, now, "refused by the provider: queued again")
            spans.phase = tracer.start_span("queued", spans.context, start_time=now)
        elif state is S.SUBMITTED:
            self._end_phase(spans, now)
            spans.sent = now
            provider = spans.provider = spans.phase = tracer.start_span(
                "provider",
                spans.context,
                start_time=now,
                attributes={"tenebra.link": -1 if record.link is None else record.link},
            )
            spans.provider_context = self._trace.set_span_in_context(provider)
        elif state is S.PARTIAL or state is S.DONE:
            index = len(record.results) - 1
            result = record.results[index]
            tracer.start_span(
                "provider.first_result" if index == 0 else "provider.result",
                spans.provider_context or spans.context,
                start_time=spans.sent or now,
                attributes={"tenebra.result.index": index, "tenebra.image_uuid": result.imageUUID},
            ).end(now)
        if state in _FINAL:
            self._end_phase(spans, now)
            self._end(record, spans, state, now)

    def _end_phase(self, spans: _Spans, now: int, event: str | None = None) -> None:
        phase = spans.phase
        if phase is None:
            return
        if event is not None and phase is spans.provider:
            phase.add_event(event, timestamp=now)
        phase.end(now)
        spans.phase = None
        if phase is spans.provider:
            spans.provider = spans.provider_context = None

    def _end(self, record: TaskRecord, spans: _Spans, state: TaskState, now: int) -> None:
        del self._open[record.upstream_uuid]
        root = spans.root
        root.set_attribute("tenebra.state", state.value)
        root.set_attribute("tenebra.images", len(record.results))
        root.set_attribute("tenebra.cost", record.cost)
        if state is not S.DONE:
            code = record.error.code if record.error is not None else state.value
            root.set_attribute("tenebra.error", code)
            root.set_status(self._trace.Status(self._trace.StatusCode.ERROR, code))
        root.end(now)

    def _parent(self, traceparent: str | None) -> Context | None:
        if traceparent is None:
            return None
        return self._propagator.extract({"traceparent": traceparent})

    # ------------------------------------------------------------------ deliveries

    def install(self, registry: TaskRegistry, deliveries: Deliveries) -> None:
        """The hooks, set only while tracing: the registry's ``moved``, and each delivery
        attempt's HTTP request (``Deliveries._send``, wrapped on this instance, so that the
        delivery code carries nothing of tracing). A delivery runs with its task's tenant and
        taskUUID bound in structlog's contextvars (``Deliveries._run``): its record, and the
        trace context on it, are found from them."""
        registry.moved = self.moved
        send: Callable[..., Awaitable[int]] = deliveries._send
        tracer, kind = self.tracer, self._trace.SpanKind.CLIENT

        async def traced(method: str, url: str, body: bytes, headers: dict[str, str]) -> int:
            bound = structlog.contextvars.get_contextvars()
            tenant, task_uuid = bound.get("tenant"), bound.get("task_uuid")
            record = (
                registry.lookup(tenant, task_uuid)
                if isinstance(tenant, str) and isinstance(task_uuid, str)
                else None
            )
            attributes: dict[str, Any] = {
                "http.request.method": method,
                "server.address": urlsplit(url).hostname or "",  # never the path: signatures
                "tenebra.delivery": str(bound.get("delivery", "")),
                "tenebra.task_uuid": str(task_uuid or ""),
            }
            parent = self._parent(record.trace if record is not None else None)
            with tracer.start_as_current_span(
                "delivery.attempt", parent, kind=kind, attributes=attributes
            ) as span:
                status = await send(method, url, body, headers)
                span.set_attribute("http.response.status_code", status)
                if status >= 400:
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
                return status

        deliveries._send = traced  # type: ignore[method-assign]

    def shutdown(self) -> None:
        """Spans still batched leave now (the SDK's provider; a no-op for another)."""
        stop = getattr(self.provider, "shutdown", None)
        if stop is not None:
            stop()


def _exporters(env: Mapping[str, str]) -> list[str]:
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return [n.strip() for n in named.split(",") if n.strip() and n.strip() != "none"]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return ["otlp"] if endpoint else []


def from_env(env: Mapping[str, str] | None = None) -> Telemetry | None:
    """Tracing as the ``OTEL_*`` variables ask, or None (off): see the module's text."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = _exporters(env)
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_* variables set but the otel extra is not installed: tracing off")
        return None
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "tenebra"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        exporter: Any
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )
            try:
                if protocol == "grpc":
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                        OTLPSpanExporter,
                    )
                else:
                    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                        OTLPSpanExporter,
                    )
            except ImportError:
                log.warning("the OTLP exporter is not installed: tracing off", protocol=protocol)
                return None
            exporter = OTLPSpanExporter()
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER: ignored", exporter=name)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on", exporters=names)
    return Telemetry(provider)
