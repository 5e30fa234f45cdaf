"""Can this machine run the appliance's node? (``appliance check``)

Each module checks one part of the host (the kernel, packages, nbdkit's interpreter, disks,
ports, the clock, multipath, the cluster) with small functions that return
:class:`~appliance.hostcheck.result.Result` records: ``ok``, ``warn`` or ``fail``, what was
found and what to do. :func:`appliance.hostcheck.runner.run_checks` runs them all; nothing
here prints, and no check changes the machine (the disk probe's temporary file is removed).
"""
