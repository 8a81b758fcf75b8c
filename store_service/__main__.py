"""``python -m store_service``: run the store until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import sys

from store_service.server import StartupError, serve
from waddle_common import logs
from waddle_common.settings import Settings


def main() -> None:
    settings = Settings()
    logs.setup("store", settings.log_level)
    # The start-up revision check would log Alembic's chatter at info.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    try:
        code = asyncio.run(serve(settings))
    except StartupError as exc:
        # One line on stderr, exit status 1: what an operator needs first.
        sys.exit(str(exc))
    sys.exit(code)


if __name__ == "__main__":
    main()
