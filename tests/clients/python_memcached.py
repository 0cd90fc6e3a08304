#!/usr/bin/python3
"""python-memcached (Debian python3-memcache) through the shared scenario.

Usage: /usr/bin/python3 tests/clients/python_memcached.py ADDR[,ADDR...]

The client reports most failures by returning 0 or None rather than
raising, and it does what it does by default: values over 1 MiB are
refused before they are sent (SERVER_MAX_VALUE_LENGTH), and a server that
closes a connection is marked dead for 30 s. `cache_cas=True` is what makes
`gets` remember the token `cas` sends: the client has no other way to pass
one.
"""

import os
import socket
import sys

# The shared scenario sits beside this script; no __pycache__ in the tree.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenario  # noqa: E402

try:
    import memcache
except ImportError as e:
    sys.exit(
        "python-memcached is not importable with %s (%s): run scripts/install-deps, "
        "which installs python3-memcache" % (sys.executable, e)
    )


class Adapter(scenario.Driver):
    def __init__(self, servers):
        self.c = memcache.Client(
            ["%s:%d" % s for s in servers],
            socket_timeout=scenario.IO_TIMEOUT_S,
            cache_cas=True,
        )

    def canon_gets(self, value):
        # The token stays inside the client (cas_ids); gets returns the value.
        return scenario.canonical(value)

    def cas_token(self, _gets_result):
        return None

    def cas(self, key, value, _token):
        return self.c.cas(key, value)


if __name__ == "__main__":
    # ValueError: `incr` of a value that is not a number hands the server's
    # CLIENT_ERROR line to int(); that is how this client reports it.
    scenario.run(Adapter, (memcache.Client.MemcachedKeyError, OSError, ValueError))
