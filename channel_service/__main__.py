"""``python -m channel_service``: run one channel shard."""

from channel_service.server import main

main()
