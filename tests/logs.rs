//! `--log-format json`: one JSON object per line on stderr, with the
//! event's fields at the top level, for log shippers.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WEBVAC_BIN: &str = env!("CARGO_BIN_EXE_webvac");

#[test]
fn json_logs_are_one_object_per_line_with_their_fields() {
    let mut child = Command::new(WEBVAC_BIN)
        .args(["-p", "0", "-l", "127.0.0.1", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn webvac");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let listening = line.contains("\"listening\"");
            let _ = tx.send(line);
            if listening {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let listening = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nbefore: {lines:?}"));
                lines.push(line);
                if v["message"] == "listening" {
                    break v;
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("no listening line ({e}): {lines:?}");
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(listening["level"], "INFO", "{listening}");
    assert!(listening["timestamp"].is_string(), "{listening}");
    let addr: std::net::SocketAddr = listening["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr field: {listening}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert!(listening["memory_limit_bytes"].is_u64(), "{listening}");
}
