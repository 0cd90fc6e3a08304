//! The deployment files in `deploy/` are checked as far as this machine
//! can: the systemd unit by `systemd-analyze verify` and its offline
//! security score, the example configurations by webvac's own parser. (The
//! container recipe and the Kubernetes manifest need an engine and a
//! cluster, which CI does not have; the healthcheck's command is tested in
//! tests/admin_cli.rs, the dashboard's metric names in tests/metrics.rs.)

use std::process::Command;

const WEBVAC_BIN: &str = env!("CARGO_BIN_EXE_webvac");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// The unit, with ExecStart pointing at the binary under test (verify
/// checks that it is executable).
fn unit_under_test() -> (tempdir::Dir, std::path::PathBuf) {
    let dir = tempdir::Dir::new("deploy-unit");
    let unit = std::fs::read_to_string(format!("{DEPLOY}/systemd/webvac.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/webvac "), "{unit}");
    let path = dir.0.join("webvac.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/webvac", WEBVAC_BIN)).unwrap();
    (dir, path)
}

#[test]
fn the_systemd_unit_verifies_cleanly_and_is_hardened() {
    let (_dir, path) = unit_under_test();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/install-deps installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Warnings (an unknown key, a bad value) go to stderr with status 0.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let level: f64 = text
        .split("Overall exposure level for webvac.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level} (0 best, 10 worst):\n{text}");
}

#[test]
fn the_example_configurations_are_valid() {
    for file in ["systemd/webvac.toml", "container/webvac.toml"] {
        let path = format!("{DEPLOY}/{file}");
        let config =
            webvac::config::Config::from_file(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        config.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(config.metrics_listen.is_some(), "{file} serves metrics");
        assert_eq!(config.log_format, webvac::config::LogFormat::Json, "{file}");
    }
}

#[test]
fn the_container_healthcheck_and_the_manifest_use_real_flags() {
    let recipe = std::fs::read_to_string(format!("{DEPLOY}/container/Containerfile")).unwrap();
    assert!(recipe.contains("HEALTHCHECK"), "{recipe}");
    assert!(recipe.contains(r#""stats", "--node", "127.0.0.1:11211""#));
    let manifest = std::fs::read_to_string(format!("{DEPLOY}/kubernetes/webvac.yaml")).unwrap();
    // Every long flag the manifest passes is one the binary knows.
    let help = Command::new(WEBVAC_BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let mut flags: Vec<&str> = manifest
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .filter(|w| w.starts_with("--") && w[2..].starts_with(|c: char| c.is_ascii_lowercase()))
        .map(|w| w.split('=').next().unwrap())
        .collect();
    flags.sort_unstable();
    flags.dedup();
    assert!(flags.len() >= 6, "{flags:?}");
    for flag in flags {
        if flag == "--node" {
            continue; // `webvac stats --node`, the probe's
        }
        assert!(
            help.contains(flag),
            "the manifest passes {flag}, unknown to webvac"
        );
    }
}

/// A scratch directory removed on drop.
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "webvac-{tag}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
