"""Defaults shared by more than one layer, in one place.

A value used by one module only stays in that module; a value that two processes or two
layers must agree on (the engine and the node daemon, the CLI and the API) lives here.
"""

from __future__ import annotations

#: seconds a replica has to answer one data request before it leaves service
REPLICA_TIMEOUT = 8.0
#: seconds a replica has to answer a flush or a FUA write: they write back whatever the
#: page cache holds (the idle monitor's pings still find a replica that stopped answering)
FLUSH_TIMEOUT = 120.0
#: seconds long control operations (snapshot, checksum, purge) may take on one replica
CONTROL_TIMEOUT = 600.0
#: nbdkit worker threads per NBD connection of an engine (docs/performance.md: more threads
#: fight over the interpreter lock without adding parallel work)
ENGINE_THREADS = 16
ENGINE_THREADS_LOCAL = 4  # with the local fast path (docs/performance.md)
#: seconds a clustered engine tries to reach its volume's witness before it gives up (and,
#: when it was leaving a replica out, is fenced: docs/membership.md, "The witness")
WITNESS_WAIT = 20.0
#: seconds between pings of an idle volume's replicas (0: off)
MONITOR_INTERVAL = 5.0
#: where the node daemon's API listens unless told otherwise
API_LISTEN = "127.0.0.1:9500"
API_URL = f"http://{API_LISTEN}"
