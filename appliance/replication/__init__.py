"""Replication: the replica protocol, the replica server, the engine core (fan-out, modes,
rebuild, salvage). Synchronous and thread-based; used by the nbdkit plugin and the CLI."""
