#!/usr/bin/python3
"""pylibmc (Debian python3-pylibmc, on libmemcached) through the shared
scenario.

Usage: /usr/bin/python3 tests/clients/pylibmc_client.py ADDR[,ADDR...]

The behaviours are pylibmc's defaults (text protocol, modula distribution
over the pool, no compression) except for the bounded timeouts and `cas`,
which `gets` and `cas` need.
"""

import os
import sys

# The shared scenario sits beside this script; no __pycache__ in the tree.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenario  # noqa: E402

try:
    import pylibmc
except ImportError as e:
    sys.exit(
        "pylibmc is not importable with %s (%s): run scripts/install-deps, "
        "which installs python3-pylibmc" % (sys.executable, e)
    )

IO_TIMEOUT_MS = scenario.IO_TIMEOUT_S * 1000


class Adapter(scenario.Driver):
    def __init__(self, servers):
        self.c = pylibmc.Client(
            ["%s:%d" % s for s in servers],
            behaviors={
                "cas": True,
                "connect_timeout": IO_TIMEOUT_MS,
                "_poll_timeout": IO_TIMEOUT_MS,
                "send_timeout": IO_TIMEOUT_MS * 1000,
                "receive_timeout": IO_TIMEOUT_MS * 1000,
            },
        )


if __name__ == "__main__":
    # SystemError: issue 17 saw pylibmc report a broken pipe as one.
    scenario.run(Adapter, (pylibmc.Error, SystemError, OSError))
