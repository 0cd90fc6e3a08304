#!/usr/bin/python3
"""Compatibility check: drive a memcached-protocol server with pymemcache.

Usage:
    /usr/bin/python3 tests/compat_pymemcache.py HOST PORT
    /usr/bin/python3 tests/compat_pymemcache.py --spawn-memcached

The first form runs against a running server (tests/compat.rs points it at
webvac). The second starts /usr/bin/memcached on a free 127.0.0.1 port and runs
against it, which shows the script itself is right about the reference.

Needs Debian's python3 with python3-pymemcache (the pyenv python on PATH does
not have it); `.ci/run` installs it. Exits 0 when every check passes, 1 with a
message naming the first failed check otherwise. The server is flushed.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

try:
    from pymemcache.client.base import Client, PooledClient
    from pymemcache.exceptions import (
        MemcacheClientError,
        MemcacheIllegalInputError,
        MemcacheServerError,
        MemcacheUnknownCommandError,
    )
except ImportError as e:  # pragma: no cover - environment problem
    sys.exit(
        "pymemcache is not importable with %s (%s): run `.ci/run`, "
        "which installs python3-pymemcache" % (sys.executable, e)
    )

# Every socket operation is bounded.
TIMEOUT_S = 10
# Largest value exercised; memcached's default item limit (-I) is 1 MiB.
LARGE_VALUE_BYTES = 500 * 1024
# A value that no default-configured server accepts (over the 1 MiB limit).
TOO_LARGE_VALUE_BYTES = 2 * 1024 * 1024
# Bound on waiting for a spawned memcached to accept connections.
SPAWN_READY_S = 10


class CheckFailed(Exception):
    pass


def check(cond, what, got=None):
    if not cond:
        raise CheckFailed("%s (got %r)" % (what, got))


def expect_eq(got, want, what):
    if got != want:
        raise CheckFailed("%s: expected %r, got %r" % (what, want, got))


def expect_raises(exc_type, fn, what):
    try:
        result = fn()
    except exc_type as e:
        return e
    except Exception as e:  # wrong exception type
        raise CheckFailed("%s: expected %s, got %s: %s" % (what, exc_type.__name__, type(e).__name__, e))
    raise CheckFailed("%s: expected %s, got result %r" % (what, exc_type.__name__, result))


def make_client(host, port, **kw):
    return Client((host, port), connect_timeout=TIMEOUT_S, timeout=TIMEOUT_S, **kw)


def test_basic(c):
    expect_eq(c.flush_all(noreply=False), True, "flush_all")
    expect_eq(c.get(b"missing"), None, "get of a missing key")
    expect_eq(c.get(b"missing", default=b"dflt"), b"dflt", "get default")
    expect_eq(c.set(b"k1", b"v1", noreply=False), True, "set")
    expect_eq(c.get(b"k1"), b"v1", "get after set")
    expect_eq(c.set("k1", "v2", noreply=False), True, "set with str key/value")
    expect_eq(c.get("k1"), b"v2", "get with str key")
    # Flags round-trip (no serde: the raw client flags come back in deserialize).
    expect_eq(c.set(b"flagged", b"x", flags=4294967295, noreply=False), True, "set with max flags")
    expect_eq(c.set(b"empty", b"", noreply=False), True, "set empty value")
    expect_eq(c.get(b"empty"), b"", "get empty value")


def test_many(c):
    values = {b"m%d" % i: b"value-%d" % i for i in range(20)}
    expect_eq(c.set_many(values, noreply=False), [], "set_many failed keys")
    got = c.get_many(list(values) + [b"not-there"])
    expect_eq(got, values, "get_many")
    expect_eq(c.get_many([]), {}, "get_many of nothing")
    expect_eq(c.delete_many([b"m0", b"m1", b"not-there"], noreply=False), True, "delete_many")
    expect_eq(c.get_many([b"m0", b"m1", b"m2"]), {b"m2": b"value-2"}, "get_many after delete_many")


def test_add_replace_append_prepend(c):
    c.delete(b"ar", noreply=False)
    expect_eq(c.replace(b"ar", b"x", noreply=False), False, "replace of a missing key")
    expect_eq(c.append(b"ar", b"x", noreply=False), False, "append to a missing key")
    expect_eq(c.prepend(b"ar", b"x", noreply=False), False, "prepend to a missing key")
    expect_eq(c.add(b"ar", b"mid", noreply=False), True, "add of a new key")
    expect_eq(c.add(b"ar", b"other", noreply=False), False, "add of an existing key")
    expect_eq(c.get(b"ar"), b"mid", "add did not overwrite")
    expect_eq(c.append(b"ar", b"-end", noreply=False), True, "append")
    expect_eq(c.prepend(b"ar", b"start-", noreply=False), True, "prepend")
    expect_eq(c.get(b"ar"), b"start-mid-end", "after append and prepend")
    expect_eq(c.replace(b"ar", b"replaced", noreply=False), True, "replace of an existing key")
    expect_eq(c.get(b"ar"), b"replaced", "after replace")


def test_cas(c):
    c.set(b"cas", b"one", noreply=False)
    value, cas = c.gets(b"cas")
    expect_eq(value, b"one", "gets value")
    check(cas is not None and cas.isdigit(), "gets returns a numeric cas", cas)
    expect_eq(c.cas(b"cas", b"two", cas, noreply=False), True, "cas with the current cas")
    expect_eq(c.get(b"cas"), b"two", "value after cas")
    expect_eq(c.cas(b"cas", b"three", cas, noreply=False), False, "cas with a stale cas")
    expect_eq(c.get(b"cas"), b"two", "stale cas did not store")
    _, cas2 = c.gets(b"cas")
    check(cas2 != cas, "cas changes after a store", (cas, cas2))
    c.delete(b"cas", noreply=False)
    expect_eq(c.cas(b"cas", b"four", cas2, noreply=False), None, "cas on a missing key")
    expect_eq(c.gets(b"cas"), (None, None), "gets of a missing key")
    c.set_many({b"g1": b"a", b"g2": b"b"}, noreply=False)
    many = c.gets_many([b"g1", b"g2", b"g3"])
    expect_eq(sorted(many), [b"g1", b"g2"], "gets_many keys")
    check(all(v[1].isdigit() for v in many.values()), "gets_many cas values", many)


def test_incr_decr(c):
    c.set(b"n", b"10", noreply=False)
    expect_eq(c.incr(b"n", 5), 15, "incr")
    expect_eq(c.decr(b"n", 3), 12, "decr")
    expect_eq(c.decr(b"n", 100), 0, "decr below zero stops at 0")
    expect_eq(c.incr(b"n", 18446744073709551615), 18446744073709551615, "incr to 2^64-1")
    expect_eq(c.incr(b"n", 2), 1, "incr wraps at 2^64")
    expect_eq(c.incr(b"nope", 1), None, "incr of a missing key")
    expect_eq(c.decr(b"nope", 1), None, "decr of a missing key")
    c.set(b"text", b"abc", noreply=False)
    expect_raises(MemcacheClientError, lambda: c.incr(b"text", 1), "incr of a non-numeric value")
    # The connection is still usable after a CLIENT_ERROR.
    expect_eq(c.get(b"text"), b"abc", "get after CLIENT_ERROR")
    expect_eq(c.incr(b"n", 1, noreply=True), None, "incr noreply")
    # The wrap shrank the number: memcached keeps the length, padding with spaces.
    expect_eq(c.get(b"n").rstrip(b" "), b"2", "value after incr noreply")
    c.set(b"pad", b"100", noreply=False)
    expect_eq(c.decr(b"pad", 95), 5, "decr shrinking the number")
    # memcached rewrites in place and pads with spaces; clients must cope.
    expect_eq(c.get(b"pad").strip(), b"5", "value after a shrinking decr")
    expect_eq(c.incr(b"pad", 1), 6, "incr after a shrinking decr")


def test_touch_and_expiry(c):
    c.set(b"t", b"v", expire=1000, noreply=False)
    expect_eq(c.touch(b"t", expire=2000, noreply=False), True, "touch of an existing key")
    expect_eq(c.touch(b"missing-t", expire=10, noreply=False), False, "touch of a missing key")
    expect_eq(c.get(b"t"), b"v", "get after touch")
    # An exptime in the past (absolute, January 1970) stores an expired item.
    c.set(b"past", b"v", expire=2592001, noreply=False)
    expect_eq(c.get(b"past"), None, "get of an item stored already expired")
    c.set(b"neg", b"v", noreply=False)
    expect_eq(c.touch(b"neg", expire=-1, noreply=False), True, "touch with a negative exptime")
    expect_eq(c.get(b"neg"), None, "item touched with a negative exptime is gone")


def test_delete_and_flush(c):
    c.set(b"d", b"v", noreply=False)
    expect_eq(c.delete(b"d", noreply=False), True, "delete of an existing key")
    expect_eq(c.delete(b"d", noreply=False), False, "delete of a missing key")
    expect_eq(c.delete(b"d"), True, "delete noreply (default)")
    c.set_many({b"f1": b"1", b"f2": b"2"}, noreply=False)
    expect_eq(c.flush_all(noreply=False), True, "flush_all")
    expect_eq(c.get_many([b"f1", b"f2"]), {}, "nothing survives flush_all")
    c.set(b"f3", b"3", noreply=False)
    expect_eq(c.flush_all(), True, "flush_all noreply (default)")
    expect_eq(c.get(b"f3"), None, "nothing survives flush_all noreply")


def test_noreply_defaults(c):
    # default_noreply=True: storage commands return True without waiting.
    expect_eq(c.set(b"nr", b"1"), True, "set noreply")
    expect_eq(c.add(b"nr", b"2"), True, "add noreply reports True even when not stored")
    expect_eq(c.replace(b"nr", b"3"), True, "replace noreply")
    expect_eq(c.append(b"nr", b"4"), True, "append noreply")
    expect_eq(c.prepend(b"nr", b"0"), True, "prepend noreply")
    expect_eq(c.touch(b"nr", 100), True, "touch noreply")
    expect_eq(c.get(b"nr"), b"034", "get after the noreply commands")
    expect_eq(c.set_many({b"nr1": b"a", b"nr2": b"b"}), [], "set_many noreply")
    expect_eq(c.get_many([b"nr1", b"nr2"]), {b"nr1": b"a", b"nr2": b"b"}, "get_many after set_many noreply")
    # dict-style access uses noreply too.
    c[b"nr3"] = b"z"
    expect_eq(c[b"nr3"], b"z", "__setitem__/__getitem__")
    del c[b"nr3"]
    expect_raises(KeyError, lambda: c[b"nr3"], "__getitem__ after __delitem__")


def test_values(c):
    binary = bytes(range(256)) * 4
    expect_eq(c.set(b"bin", binary, noreply=False), True, "set binary value")
    expect_eq(c.get(b"bin"), binary, "binary value round trip")
    crlf = b"line1\r\nEND\r\nVALUE x 0 1\r\n\r\n"
    c.set(b"crlf", crlf, noreply=False)
    expect_eq(c.get(b"crlf"), crlf, "value holding protocol lines")
    text = "héllo wörld ✓ 日本"
    c.set(b"uni", text.encode("utf-8"), noreply=False)
    expect_eq(c.get(b"uni").decode("utf-8"), text, "unicode value as utf-8 bytes")
    c.set(b"int", 12345, noreply=False)
    expect_eq(c.get(b"int"), b"12345", "int value stored as text")
    large = os.urandom(LARGE_VALUE_BYTES)
    expect_eq(c.set(b"large", large, noreply=False), True, "set large value")
    expect_eq(c.get(b"large"), large, "large value round trip")
    got = c.get_many([b"large", b"bin", b"crlf"])
    expect_eq(got.get(b"large"), large, "large value in get_many")
    expect_eq(got.get(b"bin"), binary, "binary value in get_many")


def test_keys(host, port):
    uc = make_client(host, port, allow_unicode_keys=True, encoding="utf-8")
    try:
        # With encoding="utf-8", str values are sent as UTF-8.
        expect_eq(uc.set(b"uni-str", "日本語", noreply=False), True, "set of a str value with a utf-8 client")
        expect_eq(uc.get(b"uni-str"), "日本語".encode("utf-8"), "str value comes back as utf-8 bytes")
        key = "ключ-ké"
        expect_eq(uc.set(key, b"v", noreply=False), True, "set with a unicode key")
        expect_eq(uc.get(key), b"v", "get with a unicode key")
        k250 = b"k" * 250
        expect_eq(uc.set(k250, b"v", noreply=False), True, "set with a 250-byte key")
        expect_eq(uc.get(k250), b"v", "get with a 250-byte key")
    finally:
        uc.close()


def test_errors(c):
    # Client-side key validation.
    expect_raises(MemcacheIllegalInputError, lambda: c.set(b"bad key", b"v"), "key with a space")
    expect_raises(MemcacheIllegalInputError, lambda: c.get(b"k" * 251), "251-byte key")
    expect_raises(MemcacheIllegalInputError, lambda: c.set(b"bad\nkey", b"v"), "key with a newline")
    expect_raises(MemcacheIllegalInputError, lambda: c.set("ключ", b"v"), "unicode key without allow_unicode_keys")
    # Server-side errors.
    c.set(b"nn", b"not a number", noreply=False)
    e = expect_raises(MemcacheClientError, lambda: c.incr(b"nn", 1), "incr of a non-numeric value")
    check(b"non-numeric" in e.args[0], "incr error names the cause", e.args)
    expect_raises(MemcacheClientError, lambda: c.decr(b"nn", 1), "decr of a non-numeric value")
    too_large = b"x" * TOO_LARGE_VALUE_BYTES
    expect_raises(MemcacheServerError, lambda: c.set(b"huge", too_large, noreply=False), "value over the item limit")
    expect_eq(c.get(b"huge"), None, "a rejected value is not stored")
    expect_eq(c.get(b"nn"), b"not a number", "connection usable after errors")
    # An unknown command through raw_command.
    expect_raises(MemcacheUnknownCommandError, lambda: c._misc_cmd([b"bogus_command\r\n"], b"bogus_command", False),
                  "unknown command")
    expect_eq(c.get(b"nn"), b"not a number", "connection usable after ERROR")


def test_version_and_stats(c):
    version = c.version()
    check(isinstance(version, bytes) and len(version) > 0, "version is non-empty bytes", version)
    before = c.stats()
    for name in (b"pid", b"uptime", b"time", b"version", b"curr_items", b"total_items", b"curr_connections",
                 b"get_hits", b"get_misses", b"cmd_get", b"cmd_set"):
        check(name in before, "stats has %r" % name, sorted(before))
    c.set(b"stat-key", b"v", noreply=False)
    c.get(b"stat-key")
    c.get(b"stat-missing")
    after = c.stats()
    check(after[b"get_hits"] >= before[b"get_hits"] + 1, "get_hits counts a hit", (before[b"get_hits"], after[b"get_hits"]))
    check(after[b"get_misses"] >= before[b"get_misses"] + 1, "get_misses counts a miss",
          (before[b"get_misses"], after[b"get_misses"]))
    check(after[b"cmd_set"] >= before[b"cmd_set"] + 1, "cmd_set counts a set", (before[b"cmd_set"], after[b"cmd_set"]))
    check(after[b"curr_items"] >= 1, "curr_items counts items", after[b"curr_items"])


def test_pooled(host, port):
    pool = PooledClient((host, port), connect_timeout=TIMEOUT_S, timeout=TIMEOUT_S, max_pool_size=4)
    try:
        for i in range(50):
            pool.set(b"p%d" % i, b"%d" % i, noreply=False)
        got = pool.get_many([b"p%d" % i for i in range(50)])
        expect_eq(len(got), 50, "pooled get_many count")
        expect_eq(got[b"p49"], b"49", "pooled value")
    finally:
        pool.close()


def test_quit(host, port):
    q = make_client(host, port)
    q.set(b"q", b"1", noreply=False)
    q.quit()
    # A new connection still works after the old one quit.
    q2 = make_client(host, port)
    try:
        expect_eq(q2.get(b"q"), b"1", "get on a new connection after quit")
    finally:
        q2.close()


def run_all(host, port):
    c = make_client(host, port)
    tests = [
        ("basic", lambda: test_basic(c)),
        ("many", lambda: test_many(c)),
        ("add/replace/append/prepend", lambda: test_add_replace_append_prepend(c)),
        ("cas", lambda: test_cas(c)),
        ("incr/decr", lambda: test_incr_decr(c)),
        ("touch/expiry", lambda: test_touch_and_expiry(c)),
        ("delete/flush", lambda: test_delete_and_flush(c)),
        ("noreply defaults", lambda: test_noreply_defaults(c)),
        ("values", lambda: test_values(c)),
        ("keys", lambda: test_keys(host, port)),
        ("errors", lambda: test_errors(c)),
        ("version/stats", lambda: test_version_and_stats(c)),
        ("pooled client", lambda: test_pooled(host, port)),
        ("quit", lambda: test_quit(host, port)),
    ]
    failed = []
    for name, fn in tests:
        try:
            fn()
            print("ok      %s" % name)
        except CheckFailed as e:
            failed.append(name)
            print("FAILED  %s: %s" % (name, e))
        except Exception as e:  # an unexpected exception is a failure too
            failed.append(name)
            print("FAILED  %s: unexpected %s: %s" % (name, type(e).__name__, e))
        finally:
            # A failed check may leave the connection mid-reply: start clean.
            if failed and failed[-1] == name:
                c.close()
    c.close()
    print("%d passed, %d failed" % (len(tests) - len(failed), len(failed)))
    return not failed


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def spawn_memcached():
    """Starts /usr/bin/memcached on a free 127.0.0.1 port; returns (proc, port)."""
    if not os.path.exists("/usr/bin/memcached"):
        sys.exit("/usr/bin/memcached is not installed: run `.ci/run`")
    port = free_port()
    proc = subprocess.Popen(
        ["/usr/bin/memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-m", "64", "-U", "0"],
        stdout=subprocess.DEVNULL,
        stderr=tempfile.TemporaryFile(),
    )
    deadline = time.monotonic() + SPAWN_READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("memcached exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("memcached did not accept connections within %ss" % SPAWN_READY_S)


def main(argv):
    if argv[1:] == ["--spawn-memcached"]:
        proc, port = spawn_memcached()
        try:
            ok = run_all("127.0.0.1", port)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        return 0 if ok else 1
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if run_all(argv[1], int(argv[2])) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
