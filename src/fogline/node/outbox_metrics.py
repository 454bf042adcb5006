"""Prometheus view of the outbox: backlog, drops, sends and the stream-full alarm."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fogline.node.outbox_store import StreamStats


class OutboxCollector(Collector):
    """Backlog, drops, sends and the stream-full alarm, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, StreamStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        families: list[tuple[Any, Callable[[StreamStats], float]]] = [
            (GaugeMetricFamily("fogline_outbox_backlog_records",
                               "Records stored and not yet acknowledged upstream",
                               labels=["stream"]), lambda s: s.records),
            (GaugeMetricFamily("fogline_outbox_backlog_bytes",
                               "Bytes of records stored and not yet acknowledged",
                               labels=["stream"]), lambda s: s.n_bytes),
            (GaugeMetricFamily("fogline_outbox_blocked_emitters",
                               "Emits waiting for room on a full stream",
                               labels=["stream"]), lambda s: s.blocked_emitters),
            (GaugeMetricFamily("fogline_outbox_stream_full",
                               "Alarm: 1 while a block-policy stream is full",
                               labels=["stream"]), lambda s: float(s.full)),
            (CounterMetricFamily("fogline_outbox_dropped_records",
                                 "Records dropped by the drop-oldest policy (persistent)",
                                 labels=["stream"]), lambda s: s.dropped_total),
            (CounterMetricFamily("fogline_outbox_emitted_records",
                                 "Records stored by emit", labels=["stream"]),
             lambda s: s.emitted_total),
            (CounterMetricFamily("fogline_outbox_sent_records",
                                 "Records acknowledged by JetStream", labels=["stream"]),
             lambda s: s.sent_total),
            (CounterMetricFamily("fogline_outbox_emit_timeouts",
                                 "Emits refused after waiting on a full stream",
                                 labels=["stream"]), lambda s: s.timeouts_total),
        ]
        for family, value in families:
            for name, stream in sorted(stats.items()):
                family.add_metric([name], value(stream))
            yield family
