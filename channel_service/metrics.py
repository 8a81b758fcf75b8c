"""Prometheus metrics of one channel-service process (a per-instance registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ChannelMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active_channels = Gauge(
            "waddle_channel_active_channels", "Channels held in memory by this shard", registry=r
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
        self.commit_batch = Histogram(
            "waddle_channel_commit_batch_size",
            "Publishes per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
