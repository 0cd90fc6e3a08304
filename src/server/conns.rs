//! The node's client connections and listener, for `stats conns`: per
//! socket its descriptor, its address, the listener it came through, what
//! it is doing in memcached's state names, and the seconds since it last
//! sent anything.
//!
//! A connection updates its own entry with relaxed stores at a few points
//! per read (never per request), so the hot path touches no shared line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::protocol::stats::put_stat;

/// What a connection is doing, as memcached names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Waiting for a command (`conn_waiting`).
    Waiting = 0,
    /// Part-way through a request: its data or the rest of its line
    /// (`conn_nread`).
    Reading = 1,
    /// Running requests (`conn_parse_cmd`).
    Executing = 2,
    /// Waiting for the client to take its replies (`conn_mwrite`).
    Writing = 3,
}

impl State {
    fn name(v: u8) -> &'static str {
        match v {
            1 => "conn_nread",
            2 => "conn_parse_cmd",
            3 => "conn_mwrite",
            _ => "conn_waiting",
        }
    }
}

/// One connection's entry.
#[derive(Debug)]
pub struct Conn {
    addr: String,
    state: AtomicU8,
    last_read_secs: AtomicU32,
}

impl Conn {
    /// Records what the connection does now.
    #[inline]
    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Relaxed);
    }

    /// Records that the client sent something at `now_secs`.
    #[inline]
    pub fn read_at(&self, now_secs: u32) {
        self.last_read_secs.store(now_secs, Relaxed);
    }
}

/// The listener and the live connections, by descriptor.
#[derive(Debug, Default)]
pub struct Conns {
    listener: Mutex<Option<(i32, String, u32)>>,
    open: Mutex<BTreeMap<i32, Arc<Conn>>>,
}

/// A connection's place in [`Conns`]; removed when dropped.
pub struct Registration<'a> {
    conns: &'a Conns,
    fd: i32,
    /// The entry the connection updates.
    pub conn: Arc<Conn>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.conns.open.lock().remove(&self.fd);
    }
}

impl Conns {
    /// Records the listener: its descriptor, its address as `stats conns`
    /// shows it (`tcp:…`, `unix:…`) and when it started listening.
    pub fn listening(&self, fd: i32, addr: String, now_secs: u32) {
        *self.listener.lock() = Some((fd, addr, now_secs));
    }

    /// Adds the connection on descriptor `fd` from `addr`.
    pub fn register(&self, fd: i32, addr: String, now_secs: u32) -> Registration<'_> {
        let conn = Arc::new(Conn {
            addr,
            state: AtomicU8::new(State::Waiting as u8),
            last_read_secs: AtomicU32::new(now_secs),
        });
        self.open.lock().insert(fd, conn.clone());
        Registration {
            conns: self,
            fd,
            conn,
        }
    }

    /// `stats conns`, memcached's lines without the final `END`.
    pub fn compose(&self, now_secs: u32, out: &mut Vec<u8>) {
        let listener = self.listener.lock().clone();
        let since = |t: u32| now_secs.saturating_sub(t);
        if let Some((fd, addr, at)) = &listener {
            put_stat(out, &format!("{fd}:addr"), addr);
            put_stat(out, &format!("{fd}:state"), "conn_listening");
            put_stat(out, &format!("{fd}:secs_since_last_cmd"), since(*at));
        }
        let open: Vec<(i32, Arc<Conn>)> = self
            .open
            .lock()
            .iter()
            .map(|(fd, c)| (*fd, c.clone()))
            .collect();
        for (fd, c) in open {
            put_stat(out, &format!("{fd}:addr"), &c.addr);
            if let Some((_, addr, _)) = &listener {
                put_stat(out, &format!("{fd}:listen_addr"), addr);
            }
            put_stat(
                out,
                &format!("{fd}:state"),
                State::name(c.state.load(Relaxed)),
            );
            put_stat(
                out,
                &format!("{fd}:secs_since_last_cmd"),
                since(c.last_read_secs.load(Relaxed)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_listener_then_each_connection_by_descriptor() {
        let conns = Conns::default();
        conns.listening(5, "unix:/tmp/s".into(), 100);
        let a = conns.register(9, "unix:/tmp/s".into(), 100);
        let b = conns.register(7, "unix:/tmp/s".into(), 103);
        a.conn.set_state(State::Reading);
        b.conn.set_state(State::Executing);
        let mut out = Vec::new();
        conns.compose(104, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("STAT 5:addr unix:/tmp/s\r\nSTAT 5:state conn_listening\r\n"));
        let seven = text.find("STAT 7:addr").unwrap();
        let nine = text.find("STAT 9:addr").unwrap();
        assert!(seven < nine, "{text}");
        assert!(text.contains("STAT 9:state conn_nread\r\nSTAT 9:secs_since_last_cmd 4\r\n"));
        assert!(text.contains("STAT 7:listen_addr unix:/tmp/s\r\nSTAT 7:state conn_parse_cmd\r\n"));
        drop(a);
        let mut out = Vec::new();
        conns.compose(104, &mut out);
        assert!(!String::from_utf8(out).unwrap().contains("STAT 9:"));
    }
}
