//! `stats [group]`. Replies `STAT <name> <value>` lines then `END`;
//! `stats reset` replies `RESET`.

use super::tokens::Tokens;
use super::{Request, reply};

/// Which `stats` group was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsCmd<'a> {
    /// `stats`: the general counters.
    General,
    /// `stats settings`.
    Settings,
    /// `stats reset`: zero the counters.
    Reset,
    /// `stats items`.
    Items,
    /// `stats slabs`.
    Slabs,
    /// `stats sizes`.
    Sizes,
    /// `stats conns`.
    Conns,
    /// `stats cluster`, `stats <other>`: a group handled elsewhere or unknown.
    Group(&'a [u8]),
}

/// Parses `stats` from its line's tokens.
pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    if tokens.len() == 1 {
        return Request::Stats(StatsCmd::General);
    }
    Request::Stats(match tokens.get(1) {
        b"settings" => StatsCmd::Settings,
        b"reset" => StatsCmd::Reset,
        b"items" => StatsCmd::Items,
        b"slabs" => StatsCmd::Slabs,
        b"sizes" => StatsCmd::Sizes,
        b"conns" => StatsCmd::Conns,
        b"detail" => return Request::error(reply::ERROR),
        other => StatsCmd::Group(other),
    })
}

/// `STAT <name> <value>\r\n`
pub fn put_stat(out: &mut Vec<u8>, name: &str, value: impl std::fmt::Display) {
    use std::io::Write;
    let _ = write!(out, "STAT {name} {value}\r\n");
}
