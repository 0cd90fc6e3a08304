//! Runners for the real memcached clients the compatibility tests drive:
//! libmemcached's `memccapable -a` and `tests/compat_pymemcache.py` under
//! Debian's python3, shared by `tests/compat.rs` (single node) and
//! `tests/cluster.rs` (every node of a cluster); and the client drivers of
//! `tests/clients/`, whose transcripts `tests/compat_clients.rs` compares.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use super::{MEMCCAPABLE_BIN, RunOutput, SYSTEM_PYTHON, require_tool, run_bounded};

/// memccapable runs ~30 small checks; generous for a debug build.
pub const MEMCCAPABLE_TIMEOUT: Duration = Duration::from_secs(120);
/// memccapable's own per-operation I/O timeout, seconds.
pub const MEMCCAPABLE_IO_TIMEOUT_SECS: &str = "10";
pub const PYMEMCACHE_TIMEOUT: Duration = Duration::from_secs(180);

pub fn script_path() -> String {
    format!("{}/tests/compat_pymemcache.py", env!("CARGO_MANIFEST_DIR"))
}

pub fn describe(what: &str, out: &RunOutput) -> String {
    format!(
        "{what}: exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "killed after the timeout".to_string()),
        out.stdout,
        out.stderr
    )
}

pub fn run_memccapable(port: u16) -> RunOutput {
    require_tool(MEMCCAPABLE_BIN, "libmemcached-tools' memccapable");
    let mut cmd = Command::new(MEMCCAPABLE_BIN);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-a",
        "-t",
        MEMCCAPABLE_IO_TIMEOUT_SECS,
    ]);
    run_bounded(cmd, MEMCCAPABLE_TIMEOUT)
}

/// memccapable prints one `name [pass]` / `[FAIL]` line per check and exits
/// non-zero when any fails.
pub fn assert_memccapable_passed(target: &str, out: &RunOutput) {
    let report = describe(&format!("memccapable -a against {target}"), out);
    println!("{report}");
    let failures: Vec<&str> = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .filter(|l| l.to_ascii_lowercase().contains("[fail]"))
        .collect();
    assert!(out.status.is_some_and(|s| s.success()), "{report}");
    assert!(failures.is_empty(), "failed checks {failures:?}\n{report}");
    assert!(
        out.stdout.contains("[pass]"),
        "memccapable ran no check\n{report}"
    );
}

pub fn run_pymemcache(host: &str, port: u16) -> RunOutput {
    require_tool(SYSTEM_PYTHON, "Debian's python3 with python3-pymemcache");
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.arg(script_path()).arg(host).arg(port.to_string());
    run_bounded(cmd, PYMEMCACHE_TIMEOUT)
}

pub fn assert_pymemcache_passed(target: &str, out: &RunOutput) {
    let report = describe(&format!("compat_pymemcache.py against {target}"), out);
    println!("{report}");
    assert!(out.status.is_some_and(|s| s.success()), "{report}");
    assert!(
        out.stdout.contains(" passed, 0 failed"),
        "no summary line\n{report}"
    );
}

/// PHP's command line (Debian `php-cli`), for `php-memcached`.
pub const PHP_BIN: &str = "/usr/bin/php";
/// One driver run: four clients' scenario against a debug cluster takes a
/// few seconds; the drivers bound every socket call and their whole run
/// (150 s) themselves, this is the backstop.
pub const DRIVER_TIMEOUT: Duration = Duration::from_secs(180);

/// A memcached client and the script under `tests/clients/` that drives it
/// through the shared scenario, printing one JSON line per step.
pub struct ClientDriver {
    /// The client, as the README names it.
    pub name: &'static str,
    /// The interpreter that runs the script.
    pub program: &'static str,
    /// The script, relative to `tests/clients/`.
    pub script: &'static str,
    /// The Debian packages it needs (for the message when it is missing).
    pub packages: &'static str,
}

impl ClientDriver {
    /// Runs the driver against `addrs`: one address is one server, several
    /// are a pool the client hashes keys across. Returns the transcript's
    /// lines.
    ///
    /// # Panics
    /// If the interpreter is missing, or the driver does not exit 0 within
    /// `DRIVER_TIMEOUT` (the message carries its output).
    pub fn transcript(&self, addrs: &[SocketAddr]) -> Vec<String> {
        require_tool(self.program, self.packages);
        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let mut cmd = Command::new(self.program);
        cmd.arg(format!(
            "{}/tests/clients/{}",
            env!("CARGO_MANIFEST_DIR"),
            self.script
        ))
        .arg(list.join(","));
        let out = run_bounded(cmd, DRIVER_TIMEOUT);
        let report = describe(
            &format!("{} ({}) against {}", self.name, self.script, list.join(",")),
            &out,
        );
        assert!(out.status.is_some_and(|s| s.success()), "{report}");
        out.stdout.lines().map(str::to_string).collect()
    }
}

/// The steps where two transcripts differ, each with both lines, or
/// `None` when they are equal.
pub fn transcript_diff(
    want_name: &str,
    want: &[String],
    got_name: &str,
    got: &[String],
) -> Option<String> {
    if want == got {
        return None;
    }
    let width = want_name.len().max(got_name.len());
    let missing = "(no such step)".to_string();
    let mut out = String::new();
    let mut differing = 0;
    for i in 0..want.len().max(got.len()) {
        let (w, g) = (
            want.get(i).unwrap_or(&missing),
            got.get(i).unwrap_or(&missing),
        );
        if w != g {
            differing += 1;
            out.push_str(&format!(
                "  step {}:\n    {want_name:<width$}  {w}\n    {got_name:<width$}  {g}\n",
                i + 1
            ));
        }
    }
    Some(format!(
        "{differing} of {} steps differ:\n{out}",
        want.len().max(got.len())
    ))
}
