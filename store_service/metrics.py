"""The store service's Prometheus metrics, held per instance (no global registry).

One ``StoreMetrics`` per running service; tests create their own and read
samples from ``registry``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from waddle_common.grpc_util import LATENCY_BUCKETS as GRPC_LATENCY_BUCKETS

# Seconds: a local SQLite commit is well under a millisecond without fsync,
# a few ms with it; anything past a second is an incident.
LATENCY_BUCKETS = GRPC_LATENCY_BUCKETS
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class StoreMetrics:
    """Every metric the store records, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.append_batch_size = Histogram(
            "waddle_store_append_batch_size",
            "Messages per committed append transaction (all merged callers, "
            "duplicates and fenced groups included).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.append_seconds = Histogram(
            "waddle_store_append_seconds",
            "Duration of one append transaction, BEGIN to COMMIT.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.query_seconds = Histogram(
            "waddle_store_query_seconds",
            "Duration of a read or settings/users query, by query.",
            ["query"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "waddle_store_errors_total",
            "Database errors, by operation.",
            ["op"],
            registry=self.registry,
        )
