"""Prometheus metrics of one edge process (a per-instance registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections = Gauge("waddle_edge_connections", "Open client WebSockets", registry=r)
        self.subscriptions = Gauge(
            "waddle_edge_subscriptions",
            "Channel memberships of open sockets (a v1 socket, or one v1.1 subscription)",
            registry=r,
        )
        self.connects = Counter(
            "waddle_edge_connects_total", "WebSocket connections accepted", registry=r
        )
        self.refusals = Counter(
            "waddle_edge_refusals_total",
            "Connection attempts refused before the upgrade, by reason",
            ["reason"],
            registry=r,
        )
        self.frames_in = Counter(
            "waddle_edge_frames_in_total", "Client frames received, by type", ["type"], registry=r
        )
        self.frames_out = Counter(
            "waddle_edge_frames_out_total",
            "Frames written to clients, by type",
            ["type"],
            registry=r,
        )
        self.fanout_latency = Histogram(
            "waddle_edge_fanout_latency_seconds",
            "Publish received at an edge -> frame written to this edge's sockets",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slow_consumer_closes = Counter(
            "waddle_edge_slow_consumer_closes_total",
            "Sockets closed with 1013 because their send buffer was full",
            registry=r,
        )
        self.dropped_frames = Counter(
            "waddle_edge_dropped_frames_total",
            "Ephemeral frames dropped for a slow consumer, by type",
            ["type"],
            registry=r,
        )
        self.replayed = Counter(
            "waddle_edge_replayed_messages_total",
            "Messages replayed from the store (client sync and gap fill)",
            registry=r,
        )
        self.replays_refused = Counter(
            "waddle_edge_replays_refused_total",
            "Client syncs refused because the user's or the edge's replay budget was spent",
            registry=r,
        )
        self.shard_streams = Gauge(
            "waddle_edge_shard_streams",
            "Attach streams currently open to channel shards",
            registry=r,
        )
        self.ring_shards = Gauge(
            "waddle_edge_ring_shards",
            "Channel shards this edge routes to (known shards minus down or draining ones)",
            registry=r,
        )
        self.known_shards = Gauge(
            "waddle_edge_known_shards",
            "Channel shards in the membership (static list or DNS)",
            registry=r,
        )
        self.ring_changes = Counter(
            "waddle_edge_ring_changes_total",
            "Changes of this edge's ring, by reason (down, up, drain, membership)",
            ["reason"],
            registry=r,
        )
        self.channels_moved = Counter(
            "waddle_edge_channels_moved_total",
            "Local channels re-routed to another shard, by reason",
            ["reason"],
            registry=r,
        )
        self.failover_seconds = Histogram(
            "waddle_edge_failover_seconds",
            "A shard's stream broke -> its channels re-routed to their next owners",
            buckets=(0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 30, 60),
            registry=r,
        )
        self._out: dict[str, Counter] = {}

    def frames_out_for(self, frame_type: str) -> Counter:
        child = self._out.get(frame_type)
        if child is None:
            child = self._out[frame_type] = self.frames_out.labels(frame_type)
        return child
