"""The channel service: the single owner of each channel (sequence, broadcast,
membership, presence, typing), reached by edges over one Attach stream each."""
