"""Every example of docs/client-python.md runs: each ``python`` code block is
a program (its docstring names it: ``python NAME.py ...``), written to a file
and run as a process against a started stack in development mode, driven
by a test client where it waits for someone else (``bye``)."""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.stack import Stack, start_stack
from tests.waddle_client.helpers import Recorder
from waddle_client import Message, WaddleConnection

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "client-python.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
NAME = re.compile(r"python (\w+)\.py")
WAIT = 30.0


def examples() -> dict[str, str]:
    """The doc's python blocks by program name; every block must name one."""
    found: dict[str, str] = {}
    for code in BLOCK.findall(DOC.read_text()):
        name = NAME.search(code.split("\n", 1)[0])
        assert name is not None, f"a python block of the doc is not a program:\n{code[:200]}"
        assert name.group(1) not in found, f"two examples named {name.group(1)}"
        found[name.group(1)] = code
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("docs"), dev_mode=True) as s:
        yield s


class Program:
    """One example running as a process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, path: Path, *args: str) -> Program:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(path),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def finish(self) -> str:
        """Wait for a clean exit (bounded); return what it printed."""
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), WAIT)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise
        assert self.proc.returncode == 0, err.decode()
        return out.decode()


async def run_chat(stack: Stack, path: Path) -> None:
    rooms = [f"docs-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    async with WaddleConnection(stack.edge_url, stack.token("docs-tester")) as tester:
        handles = {r: await tester.subscribe(r) for r in rooms}
        seen = {r: Recorder(h) for r, h in handles.items()}
        program = await Program.start(path, stack.edge_url, "ana", *rooms)
        try:
            for room in rooms:
                hello = await seen[room].wait_for(
                    Message, lambda m: m.username == "ana", timeout=WAIT
                )
                assert hello.content == "hello from ana"
            await handles[rooms[0]].send("hi ana")
            await handles[rooms[1]].send("bye")
        finally:
            out = await program.finish()
    for room in rooms:
        assert f"#{room}: my message is seq 1" in out
        assert f"#{room} 1 ana: hello from ana" in out
    assert f"#{rooms[0]} 2 docs-tester: hi ana" in out
    assert f"#{rooms[1]} 2 docs-tester: bye" in out
    assert "connection open" in out


async def run_history(stack: Stack, path: Path) -> None:
    room = f"docs-{uuid.uuid4().hex[:6]}"
    async with WaddleConnection(stack.edge_url, stack.token("docs-tester")) as tester:
        handle = await tester.subscribe(room)
        for i in range(25):
            await handle.send(f"earlier {i}")
    out = await (await Program.start(path, stack.edge_url, "bea", room)).finish()
    lines = out.splitlines()
    assert "26 bea: Lunch: where? (3 replies)" in lines
    assert "1 docs-tester: earlier 0" in lines and "29 bea: both" in lines
    assert "thread: ['pizza', 'sushi', 'both']" in lines
    assert lines[-1] == "read up to 29, 0 unread"
    # Pages come newest first, each oldest first: 29..10, then 9..1.
    seqs = [int(line.split(" ", 1)[0]) for line in lines if line[:1].isdigit()]
    assert seqs == [*range(10, 30), *range(1, 10)]


async def run_chat_v1(stack: Stack, path: Path) -> None:
    room = f"docs-{uuid.uuid4().hex[:6]}"
    async with WaddleConnection(stack.edge_url, stack.token("docs-tester")) as tester:
        handle = await tester.subscribe(room)
        seen = Recorder(handle)
        program = await Program.start(path, stack.edge_url, room, "cem")
        try:
            hello = await seen.wait_for(Message, lambda m: m.username == "cem", timeout=WAIT)
            assert hello.content == "hello from cem"
            await handle.send("bye")
        finally:
            out = await program.finish()
    assert "my message is seq 1" in out
    assert "#1 cem: hello from cem" in out and "#2 docs-tester: bye" in out


DRIVERS: dict[str, Callable[[Stack, Path], Awaitable[None]]] = {
    "chat": run_chat,
    "history": run_history,
    "chat_v1": run_chat_v1,
}


async def test_every_example_has_a_driver() -> None:
    assert set(examples()) == set(DRIVERS)


@pytest.mark.parametrize("name", sorted(DRIVERS))
async def test_example_runs(stack: Stack, tmp_path: Path, name: str) -> None:
    code = examples()[name]
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    await DRIVERS[name](stack, path)
