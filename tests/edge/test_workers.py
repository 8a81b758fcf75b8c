"""edge.workers without processes: ids, ports, the merged scrape, the relayed ready line."""

from __future__ import annotations

import io
import socket

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge.workers import WorkerOutput, check_ports, merge_metrics, reserve_port, worker_env
from waddle_common.settings import Settings, usable_cores


def settings(**values: object) -> Settings:
    return Settings(jwt_secret="x" * 32, **values)  # type: ignore[arg-type]


def exposition(connections: float, frames: int) -> str:
    registry = CollectorRegistry()
    Gauge("waddle_edge_connections", "Open client WebSockets", registry=registry).set(connections)
    counter = Counter("waddle_edge_frames", "Frames", ["kind"], registry=registry)
    counter.labels("text").inc(frames)
    return generate_latest(registry).decode()


def test_auto_is_one_worker_per_usable_core() -> None:
    assert settings(edge_workers="auto").edge_workers == usable_cores() >= 1
    assert settings().edge_workers == 1
    with pytest.raises(ValueError, match="edge_workers"):
        settings(edge_workers=0)


def test_each_worker_has_its_own_stable_id_and_ops_port() -> None:
    s = settings(edge_id="pod-a", edge_workers=3, edge_ops_port=9100)
    envs = [worker_env(s, 8080, i) for i in range(3)]
    assert [e["WADDLE_EDGE_ID"] for e in envs] == ["pod-a-w0", "pod-a-w1", "pod-a-w2"]
    assert [e["WADDLE_EDGE_OPS_PORT"] for e in envs] == ["9101", "9102", "9103"]
    assert {e["WADDLE_EDGE_PORT"] for e in envs} == {"8080"}
    assert worker_env(s, 8080, 1) == envs[1], "a restarted worker gets the same id and ports"
    free = settings(edge_workers=2, edge_ops_port=0)
    assert {worker_env(free, 1, i)["WADDLE_EDGE_OPS_PORT"] for i in range(2)} == {"0"}


def test_ops_ports_must_fit_below_65536() -> None:
    check_ports(settings(edge_workers=4, edge_ops_port=65531))
    with pytest.raises(ValueError, match="WADDLE_EDGE_OPS_PORT=65532"):
        check_ports(settings(edge_workers=4, edge_ops_port=65532))


def test_merged_scrape_labels_every_sample_with_its_worker() -> None:
    text = merge_metrics({"0": exposition(3, 5), "1": exposition(4, 7)}).decode()
    assert text.count("# TYPE waddle_edge_connections gauge") == 1
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }
    assert samples == {
        ("waddle_edge_connections", (("worker", "0"),)): 3.0,
        ("waddle_edge_connections", (("worker", "1"),)): 4.0,
        ("waddle_edge_frames_total", (("kind", "text"), ("worker", "0"))): 5.0,
        ("waddle_edge_frames_total", (("kind", "text"), ("worker", "1"))): 7.0,
    }


def test_merged_scrape_carries_the_supervisors_own_metrics() -> None:
    exits = Counter("waddle_edge_worker_exits", "Exits", ["worker"], registry=None)
    exits.labels("1").inc()
    text = merge_metrics({"0": exposition(1, 1)}, exits).decode()
    assert 'waddle_edge_worker_exits_total{worker="1"} 1.0' in text
    assert 'waddle_edge_connections{worker="0"} 1.0' in text


def test_a_workers_ready_line_is_relayed_as_worker_ready() -> None:
    out = io.StringIO()
    relay = WorkerOutput(out)
    ready = orjson.dumps({"event": "ready", "ready": True, "http_port": 1}).decode()
    relay.write(ready + "\n")
    relay.write('{"event":"attached","ready":false}\n')
    first, second = out.getvalue().splitlines()
    assert orjson.loads(first) == {"event": "worker ready", "http_port": 1}
    assert second == '{"event":"attached","ready":false}'


def test_reserved_port_takes_no_connections_but_lets_workers_listen() -> None:
    reserved = reserve_port("127.0.0.1", 0)
    try:
        port = reserved.getsockname()[1]
        # Bound, not listening: while no worker listens, nothing is accepted.
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
            pass
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                accepted, _ = worker.accept()
                accepted.close()
        # Someone without SO_REUSEPORT cannot take the port meanwhile.
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", port))
    finally:
        reserved.close()
