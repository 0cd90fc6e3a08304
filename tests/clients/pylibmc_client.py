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


class Adapter:
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

    def flush_all(self):
        return self.c.flush_all()

    def get(self, key):
        return self.c.get(key)

    def set(self, key, value):
        return self.c.set(key, value)

    def add(self, key, value):
        return self.c.add(key, value)

    def replace(self, key, value):
        return self.c.replace(key, value)

    def append(self, key, value):
        return self.c.append(key, value)

    def prepend(self, key, value):
        return self.c.prepend(key, value)

    def gets(self, key):
        return self.c.gets(key)

    def canon_gets(self, got):
        # (value, cas) on a hit, (None, None) on a miss.
        if isinstance(got, tuple) and len(got) == 2 and got[1] is not None:
            return [scenario.canonical(got[0]), scenario.cas_kind(got[1])]
        return scenario.canonical(got)

    def cas_token(self, got):
        return got[1] if isinstance(got, tuple) and len(got) == 2 else None

    def cas(self, key, value, token):
        return self.c.cas(key, value, token)

    def incr(self, key, delta):
        return self.c.incr(key, delta)

    def decr(self, key, delta):
        return self.c.decr(key, delta)

    def touch(self, key, ttl):
        return self.c.touch(key, ttl)

    def delete(self, key):
        return self.c.delete(key)

    def set_multi(self, mapping):
        return self.c.set_multi(mapping)

    def get_multi(self, keys):
        return self.c.get_multi(keys)

    def stats(self):
        return [s for _name, s in self.c.get_stats()]

    def version(self):
        # pylibmc has no `version` call: the version it can give is the one
        # in `stats`.
        return [s.get("version") for _name, s in self.c.get_stats()]


if __name__ == "__main__":
    # SystemError: issue 17 saw pylibmc report a broken pipe as one.
    scenario.run(Adapter, (pylibmc.Error, SystemError, OSError))
