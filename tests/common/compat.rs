//! Runners for the real memcached clients the compatibility tests drive:
//! libmemcached's `memccapable -a` and `tests/compat_pymemcache.py` under
//! Debian's python3. Shared by `tests/compat.rs` (single node) and
//! `tests/cluster.rs` (every node of a cluster).

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
