"""The scenario every Python client driver runs, and its transcript.

A driver (python_memcached.py, pylibmc_client.py, pymemcache_client.py)
wraps one client library in an adapter with the same method names and hands
it to `run`. The scenario calls the client step by step and prints one JSON
line per step, `{"step": ..., "result": ...}`, where the result is what the
client returned (or the exception it raised), made canonical: CAS tokens,
stats values and server addresses are replaced by what
kind of thing they are, so that two servers that behave alike print the
same transcript. tests/compat_clients.rs runs a driver against memcached
1.6.18 and against webvac and asserts the transcripts are equal.

php_memcached.php runs the same steps, under the same names, in PHP.

Every socket operation is bounded by the client's own timeouts
(IO_TIMEOUT_S), and the whole run by RUN_TIMEOUT_S. A client error is a
result; any other exception (a bug in the driver) ends the run with exit
status 2 and the traceback.
"""

import hashlib
import json
import random
import re
import signal
import sys
import traceback

# Every client's connect, send and receive timeout.
IO_TIMEOUT_S = 10
# The whole run; the Rust test kills the driver a little later.
RUN_TIMEOUT_S = 150

# The multi-get: 20,000 keys of 64 bytes in one call (python-memcached
# sends them as one `get` line per server, 1.3 MB for one server).
MULTI_KEYS = 20_000
# Every tenth key is stored, the rest miss (each stored key costs a
# replicated write in a debug-build cluster: about 1 ms).
MULTI_STORED_EVERY = 10

# memcached 1.6.18 with its default `-I 1m` stores an item when its 48-byte
# header, 8-byte CAS, key, key NUL and value CRLF fit in 1 MiB: a value of
# at most 1,048,576 - 59 - key bytes.
ITEM_OVERHEAD_BYTES = 59
ITEM_BYTES_MAX = 1024 * 1024

# Bytes values are shown as they are up to this length; longer ones by
# length and digest.
SHOWN_BYTES_MAX = 64
# Lists are shown whole up to this length; longer ones by length.
SHOWN_LIST_MAX = 20

# The stats fields checked: each must be a number (values not compared).
STATS_NUMBER_FIELDS = (
    "pid",
    "uptime",
    "curr_items",
    "total_items",
    "bytes",
    "curr_connections",
    "cmd_get",
    "get_hits",
    "get_misses",
    "limit_maxbytes",
    "threads",
)

# A version as memcached clients read one: major.minor.patch and nothing
# more (npm `memcached` takes the last three numbers). webvac answers
# memcached's own, so the string itself is compared.
VERSION_PATTERN = re.compile(r"^\d+\.\d+\.\d+$")
ADDRESS_PATTERN = re.compile(r"127\.0\.0\.1:\d+")


# The longest key memcached accepts.
LONGEST_KEY = "k" * 250


def multi_key(i):
    return "multi-%058d" % i


def multi_value(i):
    return b"m%d-" % i + b"v" * (i % 100)


def size_key(size):
    return "value-%07d" % size


def sized_value(size):
    """Incompressible bytes, the same on every run."""
    return random.Random(size).randbytes(size)


def scrub(text):
    """Removes what differs between two runs of one server: its address."""
    return ADDRESS_PATTERN.sub("127.0.0.1:PORT", text)


def canonical(value):
    """What the client returned, as JSON that does not depend on which
    server answered (addresses scrubbed, long bytes by length and digest)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, bytes):
        if len(value) <= SHOWN_BYTES_MAX:
            return {"bytes": value.decode("latin-1")}
        return {"bytes_len": len(value), "sha256": hashlib.sha256(value).hexdigest()[:16]}
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, (list, tuple)):
        if len(value) > SHOWN_LIST_MAX:
            return {"list_len": len(value)}
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {scrub(str(k)): canonical(v) for k, v in value.items()}
    return {"type": type(value).__name__, "repr": scrub(repr(value))}


def cas_kind(token):
    """A CAS token is opaque: only that the client got one is compared."""
    if isinstance(token, bytes):
        token = token.decode("latin-1")
    if isinstance(token, str) and token.isdigit():
        token = int(token)
    if isinstance(token, int) and not isinstance(token, bool) and token > 0:
        return "<cas token>"
    return {"unexpected cas token": canonical(token)}


def version_kind(version):
    if isinstance(version, bytes):
        version = version.decode("latin-1")
    if isinstance(version, str) and VERSION_PATTERN.match(version):
        return version
    return {"unparsed version": canonical(version)}


def stats_kinds(per_server):
    """One server's stats: for each checked field, whether it is a number."""
    out = {}
    for field in STATS_NUMBER_FIELDS:
        value = per_server.get(field)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[field] = "<number>"
        elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
            out[field] = "<number>"
        else:
            out[field] = {"not a number": canonical(value)}
    if "version" in per_server:
        out["version"] = version_kind(per_server["version"])
    return out


def distinct(results):
    """The distinct results of a per-server call, in a fixed order (a pool's
    servers answer in an order that depends on their ports)."""
    by_text = {json.dumps(r, sort_keys=True): r for r in results}
    return [by_text[text] for text in sorted(by_text)]


class Driver:
    """What the Python drivers share. A scenario call a driver does not
    define goes to its client, `self.c`, under the same name and with the
    same arguments. `gets` answers (value, token), and `stats` and
    `version` come from `get_stats()` (python-memcached's and pylibmc's
    way); a driver whose client differs defines its own."""

    def __getattr__(self, name):
        if name == "c":  # not set yet: no client to ask
            raise AttributeError(name)
        return getattr(self.c, name)

    def canon_gets(self, got):
        # (value, cas) on a hit, (None, None) on a miss.
        if isinstance(got, tuple) and len(got) == 2 and got[1] is not None:
            return [canonical(got[0]), cas_kind(got[1])]
        return canonical(got)

    def cas_token(self, got):
        return got[1] if isinstance(got, tuple) and len(got) == 2 else None

    def stats(self):
        return [s for _name, s in self.c.get_stats()]

    def version(self):
        # No `version` call: the version such a client can give is the
        # one in `stats`.
        return [s.get("version") for _name, s in self.c.get_stats()]


class Raised:
    """A client error, recorded as the step's result."""

    def __init__(self, error):
        self.error = error


class Transcript:
    def __init__(self, client_errors):
        self.client_errors = client_errors

    def step(self, name, call, canon=canonical):
        """Runs one client call, prints its canonical result, returns the
        raw result (or a `Raised`)."""
        try:
            raw = call()
            result = canon(raw)
        except self.client_errors as e:
            raw = Raised(e)
            result = {"raised": type(e).__name__, "message": scrub(str(e))}
        print(json.dumps({"step": name, "result": result}, sort_keys=True), flush=True)
        return raw


def sized_get(expected):
    def canon(got):
        if got is None:
            return None
        if got == b"old":
            return "the old value"
        return {"len": len(got), "equals what was set": got == expected}

    return canon


def multi_get_summary(stored, asked):
    def canon(got):
        got = got or {}
        return {
            "asked": asked,
            "found": len(got),
            "every value right": all(stored.get(k) == v for k, v in got.items()),
            "every stored key found": all(k in got for k in stored),
        }

    return canon


def scenario(t, d):
    """The steps, in order. `d` is the client adapter; see a driver."""
    t.step("flush_all", d.flush_all)
    t.step("get a missing key", lambda: d.get("missing"))

    t.step("set k1", lambda: d.set("k1", b"v1"))
    t.step("get k1", lambda: d.get("k1"))
    t.step("set k1 again", lambda: d.set("k1", b"v1b"))
    t.step("get k1 again", lambda: d.get("k1"))

    t.step("add an existing key", lambda: d.add("k1", b"nope"))
    t.step("add a new key", lambda: d.add("k2", b"v2"))
    t.step("get the added key", lambda: d.get("k2"))
    t.step("replace a missing key", lambda: d.replace("k3", b"nope"))
    t.step("replace an existing key", lambda: d.replace("k2", b"v2r"))
    t.step("get the replaced key", lambda: d.get("k2"))
    t.step("get the key replace missed", lambda: d.get("k3"))

    t.step("append", lambda: d.append("k1", b"+a"))
    t.step("prepend", lambda: d.prepend("k1", b"p+"))
    t.step("get after append and prepend", lambda: d.get("k1"))
    t.step("append to a missing key", lambda: d.append("k4", b"x"))
    t.step("prepend to a missing key", lambda: d.prepend("k4", b"x"))
    t.step("get the key append missed", lambda: d.get("k4"))

    # Values the client encodes itself and marks in the item's flags, which
    # the server must keep and return as they were.
    t.step("set a 250-byte key", lambda: d.set(LONGEST_KEY, b"long key"))
    t.step("get a 250-byte key", lambda: d.get(LONGEST_KEY))
    t.step("set a text value", lambda: d.set("text-value", "h\u00e9llo"))
    t.step("get a text value", lambda: d.get("text-value"))
    t.step("set an integer value", lambda: d.set("int-value", 42))
    t.step("get an integer value", lambda: d.get("int-value"))
    t.step("set a structured value", lambda: d.set("struct-value", {"a": [1, 2]}))
    t.step("get a structured value", lambda: d.get("struct-value"))

    t.step("set the cas key", lambda: d.set("cas", b"c1"))
    got = t.step("gets", lambda: d.gets("cas"), canon=d.canon_gets)
    token = d.cas_token(got)
    t.step("cas with the token from gets", lambda: d.cas("cas", b"c2", token))
    t.step("cas with the same, now stale, token", lambda: d.cas("cas", b"c3", token))
    t.step("get after the cas", lambda: d.get("cas"))
    got = t.step("gets again", lambda: d.gets("cas"), canon=d.canon_gets)
    token = d.cas_token(got)
    t.step("delete the cas key", lambda: d.delete("cas"))
    t.step("cas on a deleted key", lambda: d.cas("cas", b"c4", token))
    t.step("get after the cas on a deleted key", lambda: d.get("cas"))

    t.step("set a counter", lambda: d.set("n", b"10"))
    t.step("incr", lambda: d.incr("n", 5))
    t.step("decr", lambda: d.decr("n", 3))
    t.step("decr below zero", lambda: d.decr("n", 100))
    t.step("get the counter", lambda: d.get("n"))
    t.step("incr a missing key", lambda: d.incr("missing-counter", 1))
    t.step("decr a missing key", lambda: d.decr("missing-counter", 1))
    t.step("set a counter near 2^64", lambda: d.set("n", b"18446744073709551614"))
    t.step("incr to 2^64 - 1", lambda: d.incr("n", 1))
    t.step("incr past 2^64 wraps", lambda: d.incr("n", 1))
    t.step("set a value that is not a number", lambda: d.set("text", b"abc"))
    t.step("incr a value that is not a number", lambda: d.incr("text", 1))
    t.step("get the value that is not a number", lambda: d.get("text"))

    t.step("touch", lambda: d.touch("k1", 600))
    t.step("get after touch", lambda: d.get("k1"))
    t.step("touch a missing key", lambda: d.touch("missing", 600))

    t.step("delete", lambda: d.delete("k1"))
    t.step("get after delete", lambda: d.get("k1"))
    t.step("delete a missing key", lambda: d.delete("k1"))

    # Values of 1 byte to 1 MB, and over the limit. Each key first holds
    # "old": memcached drops it when a set is refused as too large, and a
    # client that refuses the value itself leaves it.
    limit = ITEM_BYTES_MAX - ITEM_OVERHEAD_BYTES - len(size_key(0))
    sizes = [
        ("1 B", 1),
        ("1000 B", 1000),
        ("100 KB", 100_000),
        ("500 KB", 500_000),
        ("1 MB", 1_000_000),
        ("the largest value memcached stores", limit),
        ("one byte over what memcached stores", limit + 1),
        ("1 MiB", ITEM_BYTES_MAX),
        ("1 MiB + 1", ITEM_BYTES_MAX + 1),
        ("2 MiB", 2 * ITEM_BYTES_MAX),
    ]
    for label, size in sizes:
        key = size_key(size)
        value = sized_value(size)
        t.step("set %s: the old value first" % label, lambda: d.set(key, b"old"))
        t.step("set %s" % label, lambda: d.set(key, value))
        t.step("get %s" % label, lambda: d.get(key), canon=sized_get(value))
    t.step("get a small key after the large values", lambda: d.get("k2"))

    stored = {
        multi_key(i): multi_value(i) for i in range(0, MULTI_KEYS, MULTI_STORED_EVERY)
    }
    keys = [multi_key(i) for i in range(MULTI_KEYS)]
    t.step("set_multi %d keys" % len(stored), lambda: d.set_multi(stored))
    t.step(
        "get_multi %d keys in one call" % MULTI_KEYS,
        lambda: d.get_multi(keys),
        canon=multi_get_summary(stored, MULTI_KEYS),
    )
    t.step("get after the multi-get", lambda: d.get(multi_key(0)))
    t.step("get a missing key after the multi-get", lambda: d.get(multi_key(1)))

    t.step(
        "stats",
        d.stats,
        canon=lambda servers: {
            "servers": len(servers),
            "kinds": distinct([stats_kinds(s) for s in servers]),
        },
    )
    t.step(
        "version",
        d.version,
        canon=lambda versions: {
            "servers": len(versions),
            "kinds": distinct([version_kind(v) for v in versions]),
        },
    )

    t.step("flush_all at the end", d.flush_all)
    t.step("get after flush_all", lambda: d.get("k2"))
    t.step("get a multi key after flush_all", lambda: d.get(multi_key(0)))


def run(make_adapter, client_errors):
    """The driver's main: `DRIVER ADDR[,ADDR...]`, one address for one
    server, several for a pool the client hashes keys across."""

    def out_of_time(_signum, _frame):
        raise TimeoutError("the run took over %d s" % RUN_TIMEOUT_S)

    if len(sys.argv) != 2:
        sys.exit("usage: %s 127.0.0.1:PORT[,127.0.0.1:PORT...]" % sys.argv[0])
    servers = []
    for addr in sys.argv[1].split(","):
        host, port = addr.rsplit(":", 1)
        servers.append((host, int(port)))
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(RUN_TIMEOUT_S)
    try:
        adapter = make_adapter(servers)
        scenario(Transcript(client_errors), adapter)
    except BaseException as e:  # noqa: B036 - reported, then exit 2
        sys.stderr.write(
            "%s: unexpected %s against %s: %s\n%s"
            % (sys.argv[0], type(e).__name__, sys.argv[1], e, traceback.format_exc())
        )
        sys.exit(2)
