"""The ``appliance`` command line (click). Commands parse, call and print; errors are
translated to exit codes in one place, :func:`appliance.cli.main.main`."""
