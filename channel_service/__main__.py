"""``python -m channel_service``: run one channel shard."""

from channel_service.memory import use_system_malloc

use_system_malloc()  # before anything else is imported: it re-executes the process

from channel_service.server import main  # noqa: E402

main()
