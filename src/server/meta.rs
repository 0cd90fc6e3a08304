//! Executes meta commands: each runs under one shard lock, so flags that
//! change state (`T`, `N`, `R`, `I`) and the values they report are atomic.

use std::sync::atomic::Ordering::Relaxed;

use super::Shared;
use super::execute::Action;
use crate::protocol::meta::ma::MetaArith;
use crate::protocol::meta::md::MetaDelete;
use crate::protocol::meta::me::{MetaDebug, memcached_class, memcached_item_size};
use crate::protocol::meta::mg::MetaGet;
use crate::protocol::meta::ms::MetaSet;
use crate::protocol::meta::{MetaRequest, base64, errors, hints, opaque_ok, put_key};
use crate::protocol::{Refused, put_i64, put_line, put_u64, reply};
use crate::store::dedup::Outcome;
use crate::store::{Arith, Delta, Mode, Stored, Write, bits, exptime};

/// A request id that a different kind of command already used on this key.
const ID_REUSED: &str = "CLIENT_ERROR request id already used by another command on this key";

/// The request id of a mutation, or the client error a bad `P` token gets.
fn request_id<'a>(tokens: &[&'a [u8]]) -> Result<Option<&'a [u8]>, &'static str> {
    hints::parse(tokens).map(|h| h.request_id)
}

/// Executes one meta command against the store and appends its reply.
pub fn execute(shared: &Shared, req: MetaRequest<'_>, out: &mut Vec<u8>) -> Action {
    if !matches!(req, MetaRequest::Noop) {
        shared.stats.cmd_meta.fetch_add(1, Relaxed);
    }
    match req {
        MetaRequest::Noop => put_line(out, b"MN"),
        MetaRequest::Get(g) => mg(shared, &g, out),
        MetaRequest::Set(s) => return ms(shared, &s, out),
        MetaRequest::Delete(d) => md(shared, &d, out),
        MetaRequest::Arith(a) => ma(shared, &a, out),
        MetaRequest::Debug(d) => me(shared, &d, out),
    }
    Action::Continue
}

/// Replaces whatever this command appended with one error line.
fn fail(out: &mut Vec<u8>, start: usize, error: &str) {
    out.truncate(start);
    put_line(out, error.as_bytes());
}

/// memcached's clock starts at `process_started = start - 62` (its item
/// update interval plus two seconds).
const MEMCACHED_CLOCK_OFFSET_SECS: u32 = 62;

/// ` t<secs>`: -1 for no expiry; otherwise printed as memcached's unsigned
/// 32-bit difference. An item stored already expired has memcached's
/// relative expiry 1, so its `t` wraps to `1 - current_time` on memcached's
/// relative clock; we print the same number.
fn put_ttl(out: &mut Vec<u8>, exptime_abs: u32, now: u32, started: u32) {
    out.extend_from_slice(b" t");
    if exptime_abs == 0 {
        out.extend_from_slice(b"-1");
    } else if exptime_abs == exptime::EXPIRED {
        let current = now.saturating_sub(started) + MEMCACHED_CLOCK_OFFSET_SECS;
        put_u64(out, u64::from(1u32.wrapping_sub(current)));
    } else {
        put_u64(out, u64::from(exptime_abs.wrapping_sub(now)));
    }
}

fn mg(shared: &Shared, g: &MetaGet<'_>, out: &mut Vec<u8>) {
    let f = &g.flags;
    let start = out.len();
    shared.store.with_key(&g.key, |ctx| {
        let now = ctx.now_secs;
        ctx.stats().cmd_get += 1;
        let mut created = false;
        if ctx.item().is_none() {
            ctx.stats().get_misses += 1;
            if f.vivify.is_none() {
                out.extend_from_slice(b"EN");
                for tok in &f.tokens {
                    match tok[0] {
                        b'O' if !opaque_ok(&tok[1..]) => {
                            return fail(out, start, errors::OPAQUE_TOO_LONG);
                        }
                        b'O' => {
                            out.push(b' ');
                            out.extend_from_slice(tok);
                        }
                        b'k' => put_key(out, &g.key, f.has(b'b')),
                        _ => {}
                    }
                }
                if f.has(b'q') {
                    out.truncate(start);
                } else {
                    out.extend_from_slice(b"\r\n");
                }
                return;
            }
            if ctx.insert(&[b""], 0, 0).is_err() {
                return fail(out, start, reply::NO_MEMORY_STORING);
            }
            created = true;
        } else {
            ctx.stats().get_hits += 1;
        }
        let item = ctx.meta().expect("live item");
        // memcached bumps the item at lookup, unless a flag that reports or
        // changes access state defers the bump until the reply is built (and
        // an error while building it then skips the bump).
        let bump = !f.has(b'u');
        let bump_late = [b'h', b'l', b'T', b'N', b'R'].iter().any(|&l| f.has(l));
        if bump && !bump_late {
            ctx.mark_fetched();
        }
        let (binary, value_len) = {
            let e = ctx.item().expect("live item");
            (e.has(bits::KEY_BINARY), e.value().len())
        };
        if f.has(b'v') {
            out.extend_from_slice(b"VA ");
            put_u64(out, value_len as u64);
        } else {
            out.extend_from_slice(b"HD");
        }
        let mut won = false;
        for tok in &f.tokens {
            match tok[0] {
                b'T' => {
                    ctx.set_exptime(i64::from(f.ttl.expect("parsed T")));
                    ctx.stats().touch_hits += 1;
                }
                b'N' if created => {
                    ctx.set_exptime(i64::from(f.vivify.expect("parsed N")));
                    won = true;
                }
                b'R' => {
                    // memcached reads the token with its exptime rules (over
                    // 30 days it is an absolute unix time), and wins the
                    // recache when the item expires before that time.
                    let e = ctx.meta().expect("live item");
                    let token = i64::from(f.recache.expect("parsed R"));
                    if !item.win_sent
                        && !created
                        && e.exptime != 0
                        && e.exptime < exptime::absolute(token, now)
                    {
                        won = true;
                    }
                }
                b's' => {
                    out.extend_from_slice(b" s");
                    put_u64(out, value_len as u64);
                }
                b't' => put_ttl(
                    out,
                    ctx.meta().expect("live item").exptime,
                    now,
                    shared.facts.started_unix_secs,
                ),
                b'c' => {
                    out.extend_from_slice(b" c");
                    put_u64(out, item.cas);
                }
                b'f' => {
                    out.extend_from_slice(b" f");
                    put_u64(out, u64::from(item.flags));
                }
                b'l' => {
                    out.extend_from_slice(b" l");
                    put_u64(out, u64::from(now.saturating_sub(item.last_access)));
                }
                b'h' => out.extend_from_slice(if item.fetched { b" h1" } else { b" h0" }),
                b'O' if !opaque_ok(&tok[1..]) => return fail(out, start, errors::OPAQUE_TOO_LONG),
                b'O' => {
                    out.push(b' ');
                    out.extend_from_slice(tok);
                }
                b'k' => put_key(out, &g.key, binary),
                _ => {}
            }
        }
        if item.win_sent {
            out.extend_from_slice(b" Z");
        }
        if item.stale {
            out.extend_from_slice(b" X");
            if !item.win_sent {
                won = true;
            }
        }
        if won {
            out.extend_from_slice(b" W");
            ctx.set_bit(bits::WIN_SENT, true);
        }
        out.extend_from_slice(b"\r\n");
        if f.has(b'v') {
            out.extend_from_slice(ctx.item().expect("live item").value());
            out.extend_from_slice(b"\r\n");
        }
        if bump && bump_late {
            ctx.mark_fetched();
        }
    });
}

fn ms(shared: &Shared, s: &MetaSet<'_>, out: &mut Vec<u8>) -> Action {
    let f = &s.flags;
    if let Some(refused) = s.refused {
        shared
            .store
            .reject_write(&s.key, true, matches!(refused, Refused::TooLarge { .. }));
        put_line(out, refused.reply().as_bytes());
        return Action::Swallow(refused.swallow());
    }
    // C is a CAS store in set/replace mode, a CAS check for append/prepend,
    // and ignored by add.
    let (mode, compare_cas) = match s.mode {
        Mode::Add => (Mode::Add, None),
        Mode::Replace if f.cas.is_some() => (Mode::Set, f.cas),
        m => (m, f.cas),
    };
    let mut w = Write::new(
        mode,
        &s.key,
        s.data,
        f.client_flags.unwrap_or(0),
        i64::from(f.ttl.unwrap_or(0)),
    );
    w.compare_cas = compare_cas;
    w.invalidate = f.has(b'I');
    let binary = f.has(b'b');
    let id = match request_id(&f.tokens) {
        Ok(id) => id,
        Err(e) => {
            put_line(out, e.as_bytes());
            return Action::Continue;
        }
    };
    let result = shared.store.with_key(&s.key, |ctx| {
        if let Some(id) = id {
            // A retry of a store that already ran: its original answer.
            match ctx.recorded(id) {
                Some(Outcome::Stored { cas }) => return Ok(Stored::Stored(cas)),
                Some(_) => return Err(ID_REUSED),
                None => ctx.record_as(id, None),
            }
        }
        let r = ctx.write(&w);
        // Append and prepend build a fresh item from the old one, and
        // memcached does not mark that one binary.
        if matches!(r, Stored::Stored(_)) {
            ctx.set_bit(
                bits::KEY_BINARY,
                binary && !matches!(mode, Mode::Append | Mode::Prepend),
            );
        }
        Ok(r)
    });
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            put_line(out, e.as_bytes());
            return Action::Continue;
        }
    };
    let (code, cas) = match result {
        Stored::Stored(cas) => ("HD", cas),
        Stored::NotStored => ("NS", 0),
        Stored::Exists => ("EX", 0),
        Stored::NotFound => ("NF", 0),
        Stored::TooLarge => {
            put_line(out, reply::TOO_LARGE.as_bytes());
            return Action::Continue;
        }
        Stored::NoMemory => {
            put_line(out, reply::NO_MEMORY_STORING.as_bytes());
            return Action::Continue;
        }
    };
    if code == "HD" && f.has(b'q') {
        return Action::Continue;
    }
    out.extend_from_slice(code.as_bytes());
    for tok in &f.tokens {
        match tok[0] {
            b'k' => put_key(out, &s.key, binary),
            b'O' => {
                out.push(b' ');
                out.extend_from_slice(tok);
            }
            b'c' => {
                out.extend_from_slice(b" c");
                put_u64(out, cas);
            }
            _ => {}
        }
    }
    out.extend_from_slice(b"\r\n");
    Action::Continue
}

fn md(shared: &Shared, d: &MetaDelete<'_>, out: &mut Vec<u8>) {
    let f = &d.flags;
    if f.opaque.is_some_and(|o| !opaque_ok(o)) {
        put_line(out, errors::OPAQUE_TOO_LONG.as_bytes());
        return;
    }
    let id = match request_id(&f.tokens) {
        Ok(id) => id,
        Err(e) => return put_line(out, e.as_bytes()),
    };
    let code = shared.store.with_key(&d.key, |ctx| {
        if let Some(id) = id {
            match ctx.recorded(id) {
                Some(Outcome::Deleted) => return "HD",
                Some(_) => return ID_REUSED,
                None => {}
            }
        }
        let Some(item) = ctx.meta() else {
            ctx.stats().delete_misses += 1;
            return "NF";
        };
        if f.cas.is_some_and(|c| c != item.cas) {
            return "EX";
        }
        ctx.stats().delete_hits += 1;
        if f.has(b'I') {
            // Invalidation keeps the item (marked stale, fresh CAS); doing
            // it twice changes nothing a client relies on, so it records
            // no id.
            ctx.set_bit(bits::STALE, true);
            ctx.set_bit(bits::WIN_SENT, false);
            ctx.bump_cas();
            if let Some(t) = f.ttl {
                ctx.set_exptime(i64::from(t));
            }
        } else {
            // The tombstone keeps the id, so a retry finds the delete done.
            if let Some(id) = id {
                ctx.record_as(id, None);
            }
            ctx.delete();
        }
        "HD"
    });
    if code == ID_REUSED {
        return put_line(out, code.as_bytes());
    }
    if code == "HD" && f.has(b'q') {
        return;
    }
    out.extend_from_slice(code.as_bytes());
    put_echo(out, &f.tokens, &d.key, f.has(b'b'));
    out.extend_from_slice(b"\r\n");
}

/// ` O…` and ` k…` in request order (replies that echo nothing else).
fn put_echo(out: &mut Vec<u8>, tokens: &[&[u8]], key: &[u8], binary: bool) {
    for tok in tokens {
        match tok[0] {
            b'O' => {
                out.push(b' ');
                out.extend_from_slice(tok);
            }
            b'k' => put_key(out, key, binary),
            _ => {}
        }
    }
}

fn ma(shared: &Shared, a: &MetaArith<'_>, out: &mut Vec<u8>) {
    let f = &a.flags;
    let start = out.len();
    let binary = f.has(b'b');
    let id = match request_id(&f.tokens) {
        Ok(id) => id,
        Err(e) => return put_line(out, e.as_bytes()),
    };
    shared.store.with_key(&a.key, |ctx| {
        if let Some(id) = id {
            match ctx.recorded(id) {
                Some(Outcome::Value { number, cas }) => {
                    let exptime = ctx.meta().map_or(0, |m| m.exptime);
                    let now = ctx.now_secs;
                    let started = shared.facts.started_unix_secs;
                    return ma_replay(out, a, number, cas, exptime, now, started);
                }
                Some(_) => return put_line(out, ID_REUSED.as_bytes()),
                None => ctx.record_as(id, None),
            }
        }
        let created;
        let value;
        // memcached applies `T` to the item it rewrote in place; when the
        // number grew it built a new item, and the TTL change is lost (the
        // reply still shows it).
        let mut stores_ttl = true;
        if ctx.item().is_none() && f.vivify.is_some() {
            if let Some(id) = id {
                ctx.record_as(id, Some(a.initial));
            }
            let mut digits = Vec::with_capacity(20);
            put_u64(&mut digits, a.initial);
            if ctx.insert(&[&digits], 0, 0).is_err() {
                out.extend_from_slice(b"NS");
                put_echo(out, &f.tokens, &a.key, binary);
                out.extend_from_slice(b"\r\n");
                return;
            }
            created = true;
            value = a.initial;
        } else {
            let result = ctx.arith(&Arith {
                key: &a.key,
                incr: a.incr,
                delta: a.delta,
                compare_cas: f.cas,
            });
            match result {
                Delta::Value(v, _, in_place) => {
                    created = false;
                    value = v;
                    stores_ttl = in_place;
                }
                Delta::NotFound | Delta::Exists => {
                    out.extend_from_slice(if result == Delta::NotFound {
                        b"NF"
                    } else {
                        b"EX"
                    });
                    put_echo(out, &f.tokens, &a.key, binary);
                    out.extend_from_slice(b"\r\n");
                    return;
                }
                Delta::NonNumeric => return put_line(out, reply::NON_NUMERIC.as_bytes()),
                Delta::NoMemory => return put_line(out, reply::NO_MEMORY.as_bytes()),
            }
        }
        let mut digits = Vec::with_capacity(20);
        put_u64(&mut digits, value);
        if f.has(b'v') {
            out.extend_from_slice(b"VA ");
            put_u64(out, digits.len() as u64);
        } else {
            out.extend_from_slice(b"HD");
        }
        let now = ctx.now_secs;
        let mut shown_exptime = ctx.meta().expect("live item").exptime;
        for tok in &f.tokens {
            match tok[0] {
                b'c' => {
                    out.extend_from_slice(b" c");
                    put_u64(out, ctx.meta().expect("live item").cas);
                }
                b't' => put_ttl(out, shown_exptime, now, shared.facts.started_unix_secs),
                b'T' => {
                    let ttl = i64::from(f.ttl.expect("parsed T"));
                    shown_exptime = exptime::absolute(ttl, now);
                    if stores_ttl {
                        ctx.set_exptime(ttl);
                    }
                }
                b'N' if created => {
                    let ttl = i64::from(f.vivify.expect("parsed N"));
                    shown_exptime = exptime::absolute(ttl, now);
                    ctx.set_exptime(ttl);
                }
                b'O' if !opaque_ok(&tok[1..]) => return fail(out, start, errors::OPAQUE_TOO_LONG),
                b'O' => {
                    out.push(b' ');
                    out.extend_from_slice(tok);
                }
                b'k' => put_key(out, &a.key, binary),
                _ => {}
            }
        }
        out.extend_from_slice(b"\r\n");
        if f.has(b'v') {
            put_line(out, &digits);
        }
        if f.has(b'q') && !created {
            out.truncate(start);
        }
    });
}

/// The reply to a retried `ma` whose first attempt ran: the number and CAS
/// it produced, with the flags of the retry. Nothing is applied again, so
/// `T` and `N` change nothing; `t` shows the key's expiry now.
fn ma_replay(
    out: &mut Vec<u8>,
    a: &MetaArith<'_>,
    number: u64,
    cas: u64,
    exptime_abs: u32,
    now: u32,
    started: u32,
) {
    let f = &a.flags;
    if f.has(b'q') {
        return;
    }
    let mut digits = Vec::with_capacity(20);
    put_u64(&mut digits, number);
    if f.has(b'v') {
        out.extend_from_slice(b"VA ");
        put_u64(out, digits.len() as u64);
    } else {
        out.extend_from_slice(b"HD");
    }
    for tok in &f.tokens {
        match tok[0] {
            b'c' => {
                out.extend_from_slice(b" c");
                put_u64(out, cas);
            }
            b't' => put_ttl(out, exptime_abs, now, started),
            b'O' => {
                out.push(b' ');
                out.extend_from_slice(tok);
            }
            b'k' => put_key(out, &a.key, f.has(b'b')),
            _ => {}
        }
    }
    out.extend_from_slice(b"\r\n");
    if f.has(b'v') {
        put_line(out, &digits);
    }
}

fn me(shared: &Shared, d: &MetaDebug<'_>, out: &mut Vec<u8>) {
    shared.store.with_key(&d.key, |ctx| {
        let now = ctx.now_secs;
        let Some(e) = ctx.item() else {
            return put_line(out, b"EN");
        };
        out.extend_from_slice(b"ME ");
        if e.has(bits::KEY_BINARY) {
            out.extend_from_slice(base64::encode(e.key()).as_bytes());
        } else {
            out.extend_from_slice(e.key());
        }
        out.extend_from_slice(b" exp=");
        put_i64(
            out,
            if e.exptime() == 0 {
                -1
            } else {
                i64::from(now) - i64::from(e.exptime())
            },
        );
        out.extend_from_slice(b" la=");
        put_u64(out, u64::from(now.saturating_sub(e.last_access())));
        out.extend_from_slice(b" cas=");
        put_u64(out, e.cas());
        out.extend_from_slice(if e.has(bits::FETCHED) {
            b" fetch=yes"
        } else {
            b" fetch=no"
        });
        let size = memcached_item_size(e.key().len(), e.value().len(), e.flags());
        out.extend_from_slice(b" cls=");
        put_u64(out, memcached_class(size) as u64);
        out.extend_from_slice(b" size=");
        put_u64(out, size as u64);
        out.extend_from_slice(b"\r\n");
    });
}
