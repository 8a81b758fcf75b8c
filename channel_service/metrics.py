"""Prometheus metrics of one channel-service process (a per-instance registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ChannelMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active_channels = Gauge(
            "waddle_channel_active_channels",
            "Channels held awake in memory by this shard",
            registry=r,
        )
        self.hibernated_channels = Gauge(
            "waddle_channel_hibernated_channels",
            "Channels with members that this shard holds asleep (a few hundred bytes each)",
            registry=r,
        )
        self.hibernated_bytes = Gauge(
            "waddle_channel_hibernated_bytes",
            "Memory the records of this shard's sleeping channels take (buffer and index)",
            registry=r,
        )
        self.hibernations = Counter(
            "waddle_channel_hibernations_total",
            "Channels put to sleep after WADDLE_CHANNEL_IDLE_SECONDS without an event",
            registry=r,
        )
        self.wakes = Counter(
            "waddle_channel_wakes_total",
            "Sleeping channels woken, by reason (event: an edge's event; departures: "
            "an edge's rejoin grace ended with connections missing)",
            ["reason"],
            registry=r,
        )
        self.wake_seconds = Histogram(
            "waddle_channel_wake_seconds",
            "Time to wake a sleeping channel: store load and the edges' re-registrations",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.loads = Counter(
            "waddle_channel_loads_total",
            "Channel reads from the store (full: state and recent messages; "
            "head: the sequence head of a channel taken over asleep)",
            ["kind"],
            registry=r,
        )
        for reason in ("event", "departures"):
            self.wakes.labels(reason)
        for kind in ("full", "head"):
            self.loads.labels(kind)
        self.takeovers = Counter(
            "waddle_channel_takeovers_total",
            "Channels taken over asleep from re-registrations (shard restart or ownership move)",
            registry=r,
        )
        self.trim_seconds = Histogram(
            "waddle_channel_memory_trim_seconds",
            "Time spent handing freed memory back to the system after a hibernation sweep",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.members = Gauge(
            "waddle_channel_members",
            "Connections registered across this shard's channels",
            registry=r,
        )
        self.publishes = Counter(
            "waddle_channel_publishes_total",
            "Publishes by outcome (ok, duplicate, refused, unavailable)",
            ["result"],
            registry=r,
        )
        self.broadcast_edges = Histogram(
            "waddle_channel_broadcast_edges",
            "Edges one broadcast was sent to",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.edge_streams = Gauge(
            "waddle_channel_edge_streams", "Open Attach streams from edges", registry=r
        )
        self.stream_reconnects = Counter(
            "waddle_channel_stream_reconnects_total",
            "Attach streams opened by an edge this shard had seen before",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "waddle_channel_commit_seconds",
            "Time to make one group of publishes durable (store round trip)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.commit_splits = Counter(
            "waddle_channel_commit_splits_total",
            "Group commits split in two because the store refused one of their messages",
            registry=r,
        )
        self.reads_persisted = Counter(
            "waddle_channel_reads_persisted_total",
            "Read cursors written to the store",
            registry=r,
        )
        self.cursor_write_failures = Counter(
            "waddle_channel_cursor_write_failures_total",
            "Failed read-cursor writes (retried with backoff unless the store refused them)",
            registry=r,
        )
        self.read_receipts = Counter(
            "waddle_channel_read_receipts_total",
            "Read receipts broadcast to a channel's other members (after coalescing)",
            registry=r,
        )
        self.linger_expirations = Counter(
            "waddle_channel_linger_expirations_total",
            "Users announced gone once their presence linger was over",
            registry=r,
        )
        self.commit_batch = Histogram(
            "waddle_channel_commit_batch_size",
            "Publishes per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
