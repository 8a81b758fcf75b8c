"""The packed table of sleeping channels: it behaves as a dict of records
under any sequence of puts, pops and look-ups (a model test, with growth,
shrinking, tombstones and compaction on the way), keeps its buffer bounded
by the live records, and costs about a record's bytes per channel, with no
Python object per channel."""

from __future__ import annotations

import gc
import tracemalloc

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from channel_service.dormant import Dormant, DormantTable, EdgeShare, encode

EDGES = ["edge-a", "edge-b", "édge-ç"]
KEYS = st.one_of(
    st.sampled_from([f"room-{i}" for i in range(40)] + ["", "ü" * 9, "a\nb", '"q"']),
    st.text(max_size=12),
)
USERS = st.lists(
    st.tuples(
        st.text(max_size=8),
        st.text(max_size=8),
        st.sampled_from(["online", "away", "dnd"]),
        st.integers(0, 2**53),
    ).map(list),
    max_size=4,
)
SHARES = st.builds(
    EdgeShare,
    st.sampled_from(EDGES),
    st.integers(0, 2**31),
    st.integers(0, 1000),
    st.integers(0, 1000),
    USERS,
)
RECORDS = st.lists(SHARES, max_size=3).map(tuple)


def entry_bytes(key: str, record: Dormant) -> int:
    return 6 + len(key.encode()) + len(encode(record))


class TableMatchesADict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = DormantTable()
        self.model: dict[str, Dormant] = {}

    @rule(key=KEYS, record=RECORDS)
    def put(self, key: str, record: Dormant) -> None:
        self.table.put(key, record)
        self.model[key] = record

    @rule(key=KEYS)
    def pop(self, key: str) -> None:
        assert self.table.pop(key) == self.model.pop(key, None)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert self.table.get(key) == self.model.get(key)
        assert (key in self.table) == (key in self.model)
        assert self.table.entry_size(key) == (
            entry_bytes(key, self.model[key]) if key in self.model else 0
        )

    @rule(n=st.integers(1, 60))
    def pop_many(self, n: int) -> None:
        # Empties most of the table at once: shrinking and tombstone rebuilds.
        for key in list(self.model)[:n]:
            assert self.table.pop(key) == self.model.pop(key)

    @rule(edge=st.sampled_from([*EDGES, "edge-x", "edge"]))
    def with_edge(self, edge: str) -> None:
        want = {k: r for k, r in self.model.items() if any(s.edge_id == edge for s in r)}
        assert dict(self.table.with_edge(edge)) == want

    @invariant()
    def same_size_and_members(self) -> None:
        assert len(self.table) == len(self.model)
        assert self.table.members == sum(s.count for r in self.model.values() for s in r)

    @invariant()
    def bounded(self) -> None:
        t = self.table
        capacity = t._mask + 1
        # A free slot always remains (a probe ends), and the index follows the size.
        assert len(t) + t._tombstones < capacity
        assert capacity <= max(8, 8 * len(t))
        live = sum(entry_bytes(k, r) for k, r in self.model.items())
        assert t.buffer_bytes - t._dead == live
        assert t.buffer_bytes <= live + max(65536, live)


TestTableMatchesADict = TableMatchesADict.TestCase
TestTableMatchesADict.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)


def test_rewritten_records_are_compacted() -> None:
    table = DormantTable()
    big = (EdgeShare("edge-a", 1, 1, 1, [["u", "n" * 4000, "online", 1]]),)
    small = (EdgeShare("edge-a", 1, 1, 1, []),)
    for round_ in range(200):
        table.put("room", small if round_ % 2 else big)
    assert table.get("room") == small and len(table) == 1
    # 100 big versions were written (400 KB): the dead ones left the buffer.
    assert table.buffer_bytes <= 65536 + 2 * table.entry_size("room")


def test_the_index_follows_the_number_of_sleeping_channels() -> None:
    table = DormantTable()
    record = (EdgeShare("edge-a", 1, 2, 2, []),)
    for i in range(100):
        table.put(f"room-{i}", record)
    for i in range(99):
        assert table.pop(f"room-{i}") == record
        capacity = table._mask + 1
        assert capacity <= max(8, 8 * len(table)), f"{capacity} slots for {len(table)}"
        assert table._tombstones * 4 <= capacity
    assert table.get("room-99") == record and table.members == 2


def test_a_sleeping_channel_costs_about_its_record_and_no_python_object() -> None:
    records = [
        (
            EdgeShare("edge-a", 3, 1, 1, [[f"user-{i}", f"User {i}", "online", 1_700_000_000_000]]),
            EdgeShare("edge-b", 3, 1, 1, [[f"peer-{i}", f"Peer {i}", "away", 1_700_000_000_000]]),
        )
        for i in range(10_000)
    ]
    keys = [f"channel-{i:06d}" for i in range(10_000)]
    gc.collect()
    tracemalloc.start()
    try:
        before_mem = tracemalloc.get_traced_memory()[0]
        before_objects = len(gc.get_objects())
        table = DormantTable()
        for key, record in zip(keys, records, strict=True):
            table.put(key, record)
        gc.collect()
        grown_objects = len(gc.get_objects()) - before_objects
        grown_mem = tracemalloc.get_traced_memory()[0] - before_mem
    finally:
        tracemalloc.stop()
    entry = sum(table.entry_size(k) for k in keys) / len(keys)
    per_channel = grown_mem / len(keys)
    assert grown_objects < 10, f"{grown_objects} tracked objects for 10,000 channels"
    # The entry, an index share (two 8-byte slots at a load of 1/3 to 2/3)
    # and the bytearray's over-allocation; a dict of tuples would be > 500.
    assert per_channel <= entry * 1.25 + 48, f"{per_channel:.0f} bytes per channel, entry {entry}"
    assert table.nbytes <= grown_mem
