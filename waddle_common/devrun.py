"""``make run``: the whole stack on one machine, for trying Waddle out.

Migrates the embedded database, starts store, channel and edge as three
processes with their logs interleaved on the terminal, prints the URL and
how to get a token, and stops all three on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from waddle_common.settings import Settings
from waddle_common.supervise import Service, ServiceFailed, run_to_completion, start_service


async def main() -> int:
    settings = Settings()
    base = {"WADDLE_DEV_MODE": "1"}
    services: list[Service] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_to_completion("store_service.migrate", base)
        for name, module in (
            ("store", "store_service"),
            ("channel", "channel_service"),
            ("edge", "edge"),
        ):
            services.append(await start_service(name, module, base, echo=sys.stdout))
        host = "localhost" if settings.edge_host in ("127.0.0.1", "0.0.0.0") else settings.edge_host
        url = f"http://{host}:{services[-1].port('http_port')}/"
        print(
            f"\n  Waddle is running: open {url} in two browser tabs and chat.\n"
            f"  A token for your own client:\n"
            f'    curl -s -X POST {url}dev/token -d \'{{"username": "alice"}}\'\n'
            f"  then connect to ws://{host}:{services[-1].port('http_port')}"
            "/channel/<id>/websocket with `Authorization: Bearer <token>`.\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        died = [asyncio.create_task(s.proc.wait()) for s in services]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, *died], return_when=asyncio.FIRST_COMPLETED)
        for task in (stopper, *died):
            task.cancel()
        return 0 if stop.is_set() else 1
    except ServiceFailed as exc:
        print(f"waddle: {exc}", file=sys.stderr)
        return 1
    finally:
        for service in reversed(services):
            with contextlib.suppress(Exception):
                await service.stop()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
