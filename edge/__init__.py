"""The edge: terminates client WebSockets, authenticates them, and streams
their frames to the channel shards over one gRPC stream per shard."""
