<?php
/*
 * PHP's memcached extension (Debian php-memcached, on libmemcached) through
 * the scenario of tests/clients/scenario.py, step for step and under the
 * same step names, and with the same transcript: one JSON line per step,
 * {"result": ..., "step": ...}, CAS tokens, stats values
 * and server addresses replaced by what kind of thing they are.
 *
 * Usage: php tests/clients/php_memcached.php ADDR[,ADDR...]
 *
 * One address: one server; several: a pool the extension hashes keys across
 * (its default, modula distribution). Options are the extension's defaults
 * (text protocol) except for bounded timeouts and no compression (the
 * extension compresses values over 2,000 bytes by default and then refuses
 * append and prepend; the scenario's values are incompressible anyway).
 *
 * Each step records what the call returned and the extension's result code
 * (getResultCode, by its RES_ name) and message, which is how it reports
 * every failure. Any PHP warning, error or exception is a bug in this
 * driver: the run stops with exit status 2 and the message.
 */

// Every connect, poll, send and receive, bounded.
const IO_TIMEOUT_MS = 10000;
const MULTI_KEYS = 20000;
const MULTI_STORED_EVERY = 10;
const ITEM_OVERHEAD_BYTES = 59;
const ITEM_BYTES_MAX = 1024 * 1024;
const SHOWN_BYTES_MAX = 64;
const SHOWN_LIST_MAX = 20;
const STATS_NUMBER_FIELDS = [
    'pid', 'uptime', 'curr_items', 'total_items', 'bytes', 'curr_connections',
    'cmd_get', 'get_hits', 'get_misses', 'limit_maxbytes', 'threads',
];
const VERSION_PATTERN = '/^\d+\.\d+\.\d+$/';

set_error_handler(function ($severity, $message, $file, $line) {
    throw new ErrorException($message, 0, $severity, $file, $line);
});

function scrub(string $text): string
{
    return preg_replace('/127\.0\.0\.1:\d+/', '127.0.0.1:PORT', $text);
}

function multi_key(int $i): string
{
    return sprintf('multi-%058d', $i);
}

function multi_value(int $i): string
{
    return "m$i-" . str_repeat('v', $i % 100);
}

function size_key(int $size): string
{
    return sprintf('value-%07d', $size);
}

/** Incompressible bytes, the same on every run. */
function sized_value(int $size): string
{
    $out = '';
    for ($block = 0; strlen($out) < $size; $block++) {
        $out .= hash('sha256', "$size/$block", true);
    }
    return substr($out, 0, $size);
}

function canonical($value)
{
    if ($value === null || is_bool($value) || is_int($value) || is_float($value)) {
        return $value;
    }
    if (is_string($value)) {
        if (strlen($value) <= SHOWN_BYTES_MAX) {
            return preg_match('/^[\x20-\x7e]*$/', $value)
                ? ['bytes' => scrub($value)]
                : ['hex' => bin2hex($value)];
        }
        return ['bytes_len' => strlen($value), 'sha256' => substr(hash('sha256', $value), 0, 16)];
    }
    if (is_array($value)) {
        if (count($value) > SHOWN_LIST_MAX) {
            return ['list_len' => count($value)];
        }
        $out = [];
        foreach ($value as $k => $v) {
            $out[is_string($k) ? scrub($k) : $k] = canonical($v);
        }
        return $out;
    }
    return ['type' => gettype($value)];
}

function cas_kind($token)
{
    if ((is_int($token) || is_float($token)) && $token > 0) {
        return '<cas token>';
    }
    if (is_string($token) && ctype_digit($token) && $token !== '0') {
        return '<cas token>';
    }
    return ['unexpected cas token' => canonical($token)];
}

function version_kind($version)
{
    if (is_string($version) && preg_match(VERSION_PATTERN, $version)) {
        return $version;
    }
    return ['unparsed version' => canonical($version)];
}

function stats_kinds(array $stats): array
{
    $out = [];
    foreach (STATS_NUMBER_FIELDS as $field) {
        $value = $stats[$field] ?? null;
        $out[$field] = (is_int($value) || is_float($value)
            || (is_string($value) && preg_match('/^\d+(\.\d+)?$/', trim($value))))
            ? '<number>'
            : ['not a number' => canonical($value)];
    }
    if (array_key_exists('version', $stats)) {
        $out['version'] = version_kind($stats['version']);
    }
    ksort($out);
    return $out;
}

/** Distinct per-server results in a fixed order. */
function distinct(array $results): array
{
    $by_text = [];
    foreach ($results as $r) {
        $by_text[json_encode($r)] = $r;
    }
    ksort($by_text);
    return array_values($by_text);
}

function result_code_names(): array
{
    $names = [];
    foreach ((new ReflectionClass('Memcached'))->getConstants() as $name => $value) {
        if (str_starts_with($name, 'RES_')) {
            $names[$value] = $name;
        }
    }
    return $names;
}

final class Transcript
{
    private array $codes;

    public function __construct(private Memcached $m)
    {
        $this->codes = result_code_names();
    }

    /** Runs one call, prints its canonical result and the result code, returns what it returned. */
    public function step(string $name, callable $call, ?callable $canon = null)
    {
        $raw = $call();
        $code = $this->m->getResultCode();
        $result = [
            'returned' => $canon ? $canon($raw) : canonical($raw),
            'code' => $this->codes[$code] ?? "code $code",
        ];
        if ($code !== Memcached::RES_SUCCESS) {
            $result['message'] = scrub($this->m->getResultMessage());
        }
        ksort($result);
        echo json_encode(['result' => $result, 'step' => $name], JSON_UNESCAPED_SLASHES), "\n";
        return $raw;
    }
}

function sized_get(string $expected): callable
{
    return function ($got) use ($expected) {
        if ($got === false || $got === null) {
            return canonical($got);
        }
        if ($got === 'old') {
            return 'the old value';
        }
        return ['equals what was set' => $got === $expected, 'len' => strlen($got)];
    };
}

function gets_canon($got)
{
    if (is_array($got) && array_key_exists('cas', $got)) {
        return ['cas' => cas_kind($got['cas']), 'flags' => $got['flags'] ?? null,
            'value' => canonical($got['value'] ?? null)];
    }
    return canonical($got);
}

function scenario(Transcript $t, Memcached $m): void
{
    $t->step('flush_all', fn () => $m->flush());
    $t->step('get a missing key', fn () => $m->get('missing'));

    $t->step('set k1', fn () => $m->set('k1', 'v1'));
    $t->step('get k1', fn () => $m->get('k1'));
    $t->step('set k1 again', fn () => $m->set('k1', 'v1b'));
    $t->step('get k1 again', fn () => $m->get('k1'));

    $t->step('add an existing key', fn () => $m->add('k1', 'nope'));
    $t->step('add a new key', fn () => $m->add('k2', 'v2'));
    $t->step('get the added key', fn () => $m->get('k2'));
    $t->step('replace a missing key', fn () => $m->replace('k3', 'nope'));
    $t->step('replace an existing key', fn () => $m->replace('k2', 'v2r'));
    $t->step('get the replaced key', fn () => $m->get('k2'));
    $t->step('get the key replace missed', fn () => $m->get('k3'));

    $t->step('append', fn () => $m->append('k1', '+a'));
    $t->step('prepend', fn () => $m->prepend('k1', 'p+'));
    $t->step('get after append and prepend', fn () => $m->get('k1'));
    $t->step('append to a missing key', fn () => $m->append('k4', 'x'));
    $t->step('prepend to a missing key', fn () => $m->prepend('k4', 'x'));
    $t->step('get the key append missed', fn () => $m->get('k4'));

    // Values the extension encodes itself and marks in the item's flags,
    // which the server must keep and return as they were.
    $longest_key = str_repeat('k', 250);
    $t->step('set a 250-byte key', fn () => $m->set($longest_key, 'long key'));
    $t->step('get a 250-byte key', fn () => $m->get($longest_key));
    $t->step('set a text value', fn () => $m->set('text-value', "h\u{e9}llo"));
    $t->step('get a text value', fn () => $m->get('text-value'));
    $t->step('set an integer value', fn () => $m->set('int-value', 42));
    $t->step('get an integer value', fn () => $m->get('int-value'));
    $t->step('set a structured value', fn () => $m->set('struct-value', ['a' => [1, 2]]));
    $t->step('get a structured value', fn () => $m->get('struct-value'));

    $t->step('set the cas key', fn () => $m->set('cas', 'c1'));
    $got = $t->step('gets', fn () => $m->get('cas', null, Memcached::GET_EXTENDED), 'gets_canon');
    $token = $got['cas'] ?? null;
    $t->step('cas with the token from gets', fn () => $m->cas($token, 'cas', 'c2'));
    $t->step('cas with the same, now stale, token', fn () => $m->cas($token, 'cas', 'c3'));
    $t->step('get after the cas', fn () => $m->get('cas'));
    $got = $t->step('gets again', fn () => $m->get('cas', null, Memcached::GET_EXTENDED), 'gets_canon');
    $token = $got['cas'] ?? null;
    $t->step('delete the cas key', fn () => $m->delete('cas'));
    $t->step('cas on a deleted key', fn () => $m->cas($token, 'cas', 'c4'));
    $t->step('get after the cas on a deleted key', fn () => $m->get('cas'));

    $t->step('set a counter', fn () => $m->set('n', '10'));
    $t->step('incr', fn () => $m->increment('n', 5));
    $t->step('decr', fn () => $m->decrement('n', 3));
    $t->step('decr below zero', fn () => $m->decrement('n', 100));
    $t->step('get the counter', fn () => $m->get('n'));
    $t->step('incr a missing key', fn () => $m->increment('missing-counter', 1));
    $t->step('decr a missing key', fn () => $m->decrement('missing-counter', 1));
    $t->step('set a counter near 2^64', fn () => $m->set('n', '18446744073709551614'));
    $t->step('incr to 2^64 - 1', fn () => $m->increment('n', 1));
    $t->step('incr past 2^64 wraps', fn () => $m->increment('n', 1));
    $t->step('set a value that is not a number', fn () => $m->set('text', 'abc'));
    $t->step('incr a value that is not a number', fn () => $m->increment('text', 1));
    $t->step('get the value that is not a number', fn () => $m->get('text'));

    $t->step('touch', fn () => $m->touch('k1', 600));
    $t->step('get after touch', fn () => $m->get('k1'));
    $t->step('touch a missing key', fn () => $m->touch('missing', 600));

    $t->step('delete', fn () => $m->delete('k1'));
    $t->step('get after delete', fn () => $m->get('k1'));
    $t->step('delete a missing key', fn () => $m->delete('k1'));

    // Values of 1 byte to 1 MB, and over the limit; each key holds "old"
    // first (memcached drops it when a set is refused as too large).
    $limit = ITEM_BYTES_MAX - ITEM_OVERHEAD_BYTES - strlen(size_key(0));
    $sizes = [
        ['1 B', 1],
        ['1000 B', 1000],
        ['100 KB', 100000],
        ['500 KB', 500000],
        ['1 MB', 1000000],
        ['the largest value memcached stores', $limit],
        ['one byte over what memcached stores', $limit + 1],
        ['1 MiB', ITEM_BYTES_MAX],
        ['1 MiB + 1', ITEM_BYTES_MAX + 1],
        ['2 MiB', 2 * ITEM_BYTES_MAX],
    ];
    foreach ($sizes as [$label, $size]) {
        $key = size_key($size);
        $value = sized_value($size);
        $t->step("set $label: the old value first", fn () => $m->set($key, 'old'));
        $t->step("set $label", fn () => $m->set($key, $value));
        $t->step("get $label", fn () => $m->get($key), sized_get($value));
    }
    $t->step('get a small key after the large values', fn () => $m->get('k2'));

    $stored = [];
    for ($i = 0; $i < MULTI_KEYS; $i += MULTI_STORED_EVERY) {
        $stored[multi_key($i)] = multi_value($i);
    }
    $keys = [];
    for ($i = 0; $i < MULTI_KEYS; $i++) {
        $keys[] = multi_key($i);
    }
    $t->step(sprintf('set_multi %d keys', count($stored)), fn () => $m->setMulti($stored));
    $t->step(
        sprintf('get_multi %d keys in one call', MULTI_KEYS),
        fn () => $m->getMulti($keys),
        function ($got) use ($stored) {
            $got = is_array($got) ? $got : [];
            $right = true;
            foreach ($got as $k => $v) {
                $right = $right && (($stored[(string) $k] ?? null) === $v);
            }
            $all = true;
            foreach ($stored as $k => $_) {
                $all = $all && array_key_exists($k, $got);
            }
            return ['asked' => MULTI_KEYS, 'every stored key found' => $all,
                'every value right' => $right, 'found' => count($got)];
        }
    );
    $t->step('get after the multi-get', fn () => $m->get(multi_key(0)));
    $t->step('get a missing key after the multi-get', fn () => $m->get(multi_key(1)));

    $t->step('stats', fn () => $m->getStats(), fn ($per_server) => is_array($per_server)
        ? ['kinds' => distinct(array_map('stats_kinds', array_values($per_server))),
            'servers' => count($per_server)]
        : canonical($per_server));
    $t->step('version', fn () => $m->getVersion(), fn ($per_server) => is_array($per_server)
        ? ['kinds' => distinct(array_map('version_kind', array_values($per_server))),
            'servers' => count($per_server)]
        : canonical($per_server));

    $t->step('flush_all at the end', fn () => $m->flush());
    $t->step('get after flush_all', fn () => $m->get('k2'));
    $t->step('get a multi key after flush_all', fn () => $m->get(multi_key(0)));
}

function main(array $argv): int
{
    if (count($argv) !== 2) {
        fwrite(STDERR, "usage: php {$argv[0]} 127.0.0.1:PORT[,127.0.0.1:PORT...]\n");
        return 2;
    }
    if (!class_exists('Memcached')) {
        fwrite(STDERR, "PHP's memcached extension is not loaded: run scripts/install-deps, "
            . "which installs php-cli and php-memcached\n");
        return 2;
    }
    $m = new Memcached();
    $options = [
        Memcached::OPT_COMPRESSION => false,
        Memcached::OPT_CONNECT_TIMEOUT => IO_TIMEOUT_MS,
        Memcached::OPT_POLL_TIMEOUT => IO_TIMEOUT_MS,
        Memcached::OPT_SEND_TIMEOUT => IO_TIMEOUT_MS * 1000,
        Memcached::OPT_RECV_TIMEOUT => IO_TIMEOUT_MS * 1000,
    ];
    if (!$m->setOptions($options)) {
        fwrite(STDERR, 'setOptions failed: ' . $m->getResultMessage() . "\n");
        return 2;
    }
    foreach (explode(',', $argv[1]) as $addr) {
        [$host, $port] = explode(':', $addr);
        if (!$m->addServer($host, (int) $port)) {
            fwrite(STDERR, "addServer $addr failed: " . $m->getResultMessage() . "\n");
            return 2;
        }
    }
    try {
        scenario(new Transcript($m), $m);
    } catch (Throwable $e) {
        fwrite(STDERR, "{$argv[0]}: unexpected " . get_class($e) . " against {$argv[1]}: "
            . $e->getMessage() . "\n" . $e->getTraceAsString() . "\n");
        return 2;
    }
    return 0;
}

exit(main($argv));
