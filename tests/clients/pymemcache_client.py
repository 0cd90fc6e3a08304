#!/usr/bin/python3
"""pymemcache (Debian python3-pymemcache) through the shared scenario.

Usage: /usr/bin/python3 tests/clients/pymemcache_client.py ADDR[,ADDR...]

One address: `Client`; several: `HashClient`, which hashes keys across
them (rendezvous hashing). Both wait for every reply (`default_noreply`
off: pymemcache's default sends storage commands `noreply` and reports
success whatever the server did). `HashClient` has no `stats` or
`version`: they are asked of each server's own `Client`, as an
application would.

tests/compat_pymemcache.py checks pymemcache's calls one by one against a
server; this driver compares what it returns against memcached's.
"""

import os
import sys

# The shared scenario sits beside this script; no __pycache__ in the tree.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenario  # noqa: E402

try:
    from pymemcache.client.base import Client
    from pymemcache.client.hash import HashClient
    from pymemcache.exceptions import MemcacheError
except ImportError as e:
    sys.exit(
        "pymemcache is not importable with %s (%s): run scripts/install-deps, "
        "which installs python3-pymemcache" % (sys.executable, e)
    )


class Adapter(scenario.Driver):
    def __init__(self, servers):
        timeouts = {
            "connect_timeout": scenario.IO_TIMEOUT_S,
            "timeout": scenario.IO_TIMEOUT_S,
            "default_noreply": False,
        }
        if len(servers) == 1:
            self.c = Client(servers[0], **timeouts)
            self.servers = [self.c]
        else:
            self.c = HashClient(servers, **timeouts)
            self.servers = [self.c.clients[k] for k in sorted(self.c.clients)]

    def set_multi(self, mapping):
        return self.c.set_many(mapping)

    def get_multi(self, keys):
        return {k.decode() if isinstance(k, bytes) else k: v
                for k, v in self.c.get_many(keys).items()}

    def stats(self):
        return [
            {k.decode() if isinstance(k, bytes) else k: v for k, v in s.stats().items()}
            for s in self.servers
        ]

    def version(self):
        return [s.version() for s in self.servers]


if __name__ == "__main__":
    scenario.run(Adapter, (MemcacheError, OSError))
