"""The engine process: the nbdkit plugin entry point (thin), the engine service behind it,
and launching nbdkit."""
