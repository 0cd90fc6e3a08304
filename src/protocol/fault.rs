//! `fault <setting> <value>`: webvac's runtime fault injection, for tests.
//!
//! ```text
//! fault clock_offset_ms <i64>          the node's clock reads exactly this far ahead (ms)
//! fault clock_rate <f64>               and runs at this rate from now on
//! fault drop_peers <id,id,...|->       cut the node off from these members (`-`: heal)
//! fault layout_quorums <R>,<W>         install the next layout epoch with these
//!                                      default quorums; the other members follow
//! ```
//!
//! Each answers `OK`. A node accepts the command only with `[faults] control`
//! on; without it the line is an unknown command (`ERROR`), exactly as on
//! memcached, whatever follows `fault`. That is why a malformed line parses
//! to [`Request::Fault(None)`](Request::Fault) rather than to an error: the
//! node decides between `ERROR` and `CLIENT_ERROR bad command line format`.
//! Ranges (a rate from 0.5 to 2.0, ids of other members) are the node's to
//! check, as for the same keys in `[faults]`.

use super::Request;
use super::tokens::Tokens;

/// The longest `drop_peers` list: every member but the node itself, at the
/// HLC's id limit. The line bound (2 KiB) cuts it shorter in practice.
pub const DROP_PEERS_MAX: usize = crate::store::hlc::NODE_ID_MAX as usize;

/// One runtime fault setting.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultCmd {
    /// `fault clock_offset_ms <i64>`.
    ClockOffsetMs(i64),
    /// `fault clock_rate <f64>`.
    ClockRate(f64),
    /// `fault drop_peers <ids>`; empty for `-`.
    DropPeers(Vec<u16>),
    /// `fault layout_quorums <R>,<W>`: install the next layout epoch with
    /// these default quorums (the other members follow it).
    LayoutQuorums(u8, u8),
}

/// Parses `fault` from its line's tokens: `None` when malformed.
pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    Request::Fault(parse_setting(tokens.as_slice()))
}

fn parse_setting(tokens: &[&[u8]]) -> Option<FaultCmd> {
    let [_, name, value] = tokens else {
        return None;
    };
    let value = std::str::from_utf8(value).ok()?;
    match *name {
        b"clock_offset_ms" => value.parse().ok().map(FaultCmd::ClockOffsetMs),
        b"clock_rate" if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
            value.parse().ok().map(FaultCmd::ClockRate)
        }
        b"drop_peers" => parse_ids(value).map(FaultCmd::DropPeers),
        b"layout_quorums" => {
            let (r, w) = value.split_once(',')?;
            let number = |n: &str| {
                let digits = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
                digits.then(|| n.parse().ok()).flatten()
            };
            Some(FaultCmd::LayoutQuorums(number(r)?, number(w)?))
        }
        _ => None,
    }
}

/// A `drop_peers` list: `2,3`, or `-` for none (also the
/// `--fault-drop-peers` flag's syntax). `None` when malformed.
pub fn parse_ids(text: &str) -> Option<Vec<u16>> {
    if text == "-" {
        return Some(Vec::new());
    }
    let ids = text
        .split(',')
        .map(|id| {
            let digits = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
            digits.then(|| id.parse().ok()).flatten()
        })
        .collect::<Option<Vec<u16>>>()?;
    (ids.len() <= DROP_PEERS_MAX).then_some(ids)
}

/// Appends the command line for `cmd`.
pub fn compose(out: &mut Vec<u8>, cmd: &FaultCmd) {
    let line = match cmd {
        FaultCmd::ClockOffsetMs(ms) => format!("fault clock_offset_ms {ms}"),
        FaultCmd::ClockRate(rate) => format!("fault clock_rate {rate}"),
        FaultCmd::DropPeers(ids) => format!("fault drop_peers {}", ids_text(ids)),
        FaultCmd::LayoutQuorums(r, w) => format!("fault layout_quorums {r},{w}"),
    };
    super::put_line(out, line.as_bytes());
}

/// A `drop_peers` list as the command (and `stats`) writes it: `2,3`, or
/// `-` for none.
pub fn ids_text(ids: &[u16]) -> String {
    if ids.is_empty() {
        return "-".to_string();
    }
    let ids: Vec<String> = ids.iter().map(u16::to_string).collect();
    ids.join(",")
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn fault_of(line: &[u8]) -> Option<FaultCmd> {
        match one(line).0 {
            Request::Fault(f) => f,
            other => panic!("expected a fault command, got {other:?}"),
        }
    }

    #[test]
    fn parses_each_setting() {
        assert_eq!(
            fault_of(b"fault clock_offset_ms -1500\r\n"),
            Some(FaultCmd::ClockOffsetMs(-1500))
        );
        assert_eq!(
            fault_of(b"fault clock_offset_ms 42\r\n"),
            Some(FaultCmd::ClockOffsetMs(42))
        );
        assert_eq!(
            fault_of(b"fault clock_rate 1.25\r\n"),
            Some(FaultCmd::ClockRate(1.25))
        );
        assert_eq!(
            fault_of(b"fault clock_rate 2\r\n"),
            Some(FaultCmd::ClockRate(2.0))
        );
        assert_eq!(
            fault_of(b"fault drop_peers 2,3\r\n"),
            Some(FaultCmd::DropPeers(vec![2, 3]))
        );
        assert_eq!(
            fault_of(b"fault drop_peers 7\n"),
            Some(FaultCmd::DropPeers(vec![7]))
        );
        assert_eq!(
            fault_of(b"fault drop_peers -\r\n"),
            Some(FaultCmd::DropPeers(vec![]))
        );
        assert_eq!(
            fault_of(b"fault layout_quorums 1,3\r\n"),
            Some(FaultCmd::LayoutQuorums(1, 3))
        );
    }

    #[test]
    fn malformed_lines_parse_to_none() {
        for line in [
            &b"fault\r\n"[..],
            b"fault clock_offset_ms\r\n",
            b"fault clock_offset_ms 1 2\r\n",
            b"fault clock_offset_ms 1.5\r\n",
            b"fault clock_offset_ms 99999999999999999999\r\n",
            b"fault clock_rate -1\r\n",
            b"fault clock_rate NaN\r\n",
            b"fault clock_rate inf\r\n",
            b"fault clock_rate 1e3\r\n",
            b"fault clock_rate x\r\n",
            b"fault drop_peers\r\n",
            b"fault drop_peers 2,,3\r\n",
            b"fault drop_peers 2,\r\n",
            b"fault drop_peers +2\r\n",
            b"fault drop_peers 70000\r\n",
            b"fault drop_peers a,b\r\n",
            b"fault drop_peers --\r\n",
            b"fault layout_quorums 1\r\n",
            b"fault layout_quorums 1,\r\n",
            b"fault layout_quorums ,2\r\n",
            b"fault layout_quorums 1,2,3\r\n",
            b"fault layout_quorums 1,300\r\n",
            b"fault layout_quorums -1,2\r\n",
            b"fault clock 1\r\n",
            b"fault CLOCK_RATE 1\r\n",
        ] {
            assert_eq!(fault_of(line), None, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn compose_round_trips() {
        for cmd in [
            FaultCmd::ClockOffsetMs(-1500),
            FaultCmd::ClockOffsetMs(i64::MAX),
            FaultCmd::ClockRate(0.5),
            FaultCmd::ClockRate(1.0),
            FaultCmd::ClockRate(1.999),
            FaultCmd::DropPeers(vec![]),
            FaultCmd::DropPeers(vec![1, 4095]),
            FaultCmd::LayoutQuorums(2, 3),
        ] {
            let mut out = Vec::new();
            compose(&mut out, &cmd);
            assert!(out.ends_with(b"\r\n"));
            let (parsed, consumed) = one(&out);
            assert_eq!(consumed, out.len());
            assert!(
                matches!(parsed, Request::Fault(Some(ref c)) if *c == cmd),
                "{cmd:?}"
            );
        }
    }
}
