//! `cluster <change>`: webvac's membership and layout administration on the
//! client port (a cluster member only; a single node answers `ERROR`, the
//! unknown command it is there).
//!
//! ```text
//! cluster quorums <R> <W>     set the cluster's default read and write quorums
//!                             (1..=N): a new layout epoch, decided by the
//!                             members (see the README, "Layout epochs")
//! cluster leave <ID>          member ID hands its partitions to the others
//!                             (a move), then leaves the layout and stops; a
//!                             standby member leaves at once
//! cluster join <ID>           standby member ID takes its share of the
//!                             partitions (a move)
//! cluster replace <OLD> <NEW> standby member NEW takes the place of OLD,
//!                             which leaves once its partitions are moved
//! cluster cancel              cancel the move under way: the layout before
//!                             it comes back (no write is lost)
//! ```
//!
//! A move answers `OK epoch <E>` once it has *started* (E is its transition
//! epoch); `stats cluster` shows `transfers_pending` until it has settled.
//!
//! Answers `OK epoch <E>` once the new layout is decided and installed on
//! the node asked; `SERVER_ERROR <why>` when it was not (another change won,
//! too few members could vote; the reason says which); `CLIENT_ERROR bad
//! command line format` for a malformed line.

use super::{Request, Tokens};

/// One administrative change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterCmd {
    /// `cluster quorums <R> <W>`.
    Quorums {
        /// The new default R.
        read: u8,
        /// The new default W.
        write: u8,
    },
    /// `cluster leave <ID>`.
    Leave {
        /// The member that leaves.
        id: u16,
    },
    /// `cluster join <ID>`.
    Join {
        /// The standby member that takes partitions.
        id: u16,
    },
    /// `cluster replace <OLD> <NEW>`.
    Replace {
        /// The member that leaves.
        old: u16,
        /// The standby member that takes its place.
        new: u16,
    },
    /// `cluster cancel`.
    Cancel,
}

/// Parses `cluster` from its line's tokens: `None` when malformed.
pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    Request::Cluster(parse_cmd(tokens.as_slice()))
}

fn parse_cmd(tokens: &[&[u8]]) -> Option<ClusterCmd> {
    let number = |n: &[u8]| -> Option<u8> {
        let digits = !n.is_empty() && n.len() <= 3 && n.iter().all(u8::is_ascii_digit);
        digits
            .then(|| std::str::from_utf8(n).ok()?.parse().ok())
            .flatten()
    };
    match tokens {
        [_, b"quorums", r, w] => Some(ClusterCmd::Quorums {
            read: number(r)?,
            write: number(w)?,
        }),
        [_, b"leave", id] => Some(ClusterCmd::Leave { id: node_id(id)? }),
        [_, b"join", id] => Some(ClusterCmd::Join { id: node_id(id)? }),
        [_, b"replace", old, new] => Some(ClusterCmd::Replace {
            old: node_id(old)?,
            new: node_id(new)?,
        }),
        [_, b"cancel"] => Some(ClusterCmd::Cancel),
        _ => None,
    }
}

fn node_id(id: &[u8]) -> Option<u16> {
    let digits = !id.is_empty() && id.len() <= 5 && id.iter().all(u8::is_ascii_digit);
    digits
        .then(|| std::str::from_utf8(id).ok()?.parse().ok())
        .flatten()
}

/// Appends the command line for `cmd`.
pub fn compose(out: &mut Vec<u8>, cmd: &ClusterCmd) {
    let line = match cmd {
        ClusterCmd::Quorums { read, write } => format!("cluster quorums {read} {write}"),
        ClusterCmd::Leave { id } => format!("cluster leave {id}"),
        ClusterCmd::Join { id } => format!("cluster join {id}"),
        ClusterCmd::Replace { old, new } => format!("cluster replace {old} {new}"),
        ClusterCmd::Cancel => "cluster cancel".to_string(),
    };
    super::put_line(out, line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn cmd_of(line: &[u8]) -> Option<ClusterCmd> {
        match one(line).0 {
            Request::Cluster(c) => c,
            other => panic!("expected a cluster command, got {other:?}"),
        }
    }

    #[test]
    fn parses_and_composes() {
        let q = ClusterCmd::Quorums { read: 2, write: 3 };
        assert_eq!(cmd_of(b"cluster quorums 2 3\r\n"), Some(q.clone()));
        let mut out = Vec::new();
        compose(&mut out, &q);
        assert_eq!(out, b"cluster quorums 2 3\r\n");
        let leave = ClusterCmd::Leave { id: 4 };
        assert_eq!(cmd_of(b"cluster leave 4\r\n"), Some(leave.clone()));
        out.clear();
        compose(&mut out, &leave);
        assert_eq!(out, b"cluster leave 4\r\n");
        for (line, cmd) in [
            (&b"cluster join 5\r\n"[..], ClusterCmd::Join { id: 5 }),
            (
                b"cluster replace 3 6\r\n",
                ClusterCmd::Replace { old: 3, new: 6 },
            ),
            (b"cluster cancel\r\n", ClusterCmd::Cancel),
        ] {
            assert_eq!(cmd_of(line), Some(cmd.clone()));
            out.clear();
            compose(&mut out, &cmd);
            assert_eq!(out, line);
        }
        for bad in [
            &b"cluster\r\n"[..],
            b"cluster quorums\r\n",
            b"cluster quorums 2\r\n",
            b"cluster quorums 2 3 4\r\n",
            b"cluster quorums -1 2\r\n",
            b"cluster quorums 2 300\r\n",
            b"cluster quorums x 2\r\n",
            b"cluster leave\r\n",
            b"cluster leave x\r\n",
            b"cluster leave 70000\r\n",
            b"cluster leave 2 3\r\n",
            b"cluster join\r\n",
            b"cluster replace 3\r\n",
            b"cluster replace 3 x\r\n",
            b"cluster cancel 1\r\n",
        ] {
            assert_eq!(cmd_of(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
