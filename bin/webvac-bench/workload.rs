//! What a connection sends: keys, their distribution, values, and the bytes
//! of each request in the text or meta protocol.

use rand::Rng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `get k1 k2 …` and `set k 0 0 n`.
    Text,
    /// `mg k v` (a multi-get is `mg k v q` per key, then `mn`) and `ms k n`.
    Meta,
}

/// How keys are drawn from `0..keys`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum KeyDist {
    Uniform,
    /// Zipf with this exponent; key 0 is the most popular.
    Zipf(f64),
}

impl std::str::FromStr for KeyDist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "uniform" {
            return Ok(KeyDist::Uniform);
        }
        if let Some(p) = s.strip_prefix("zipf:") {
            let e: f64 = p.parse().map_err(|_| format!("bad zipf exponent {p:?}"))?;
            if !(e > 0.0 && e.is_finite()) {
                return Err(format!("zipf exponent must be > 0, got {e}"));
            }
            return Ok(KeyDist::Zipf(e));
        }
        Err(format!("expected uniform or zipf:S, got {s:?}"))
    }
}

/// A value size: `100`, or a uniform range `10-1000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SizeRange {
    pub min: usize,
    pub max: usize,
}

impl std::str::FromStr for SizeRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad size {t:?}"))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if min > max {
            return Err(format!("size range {min}-{max} is empty"));
        }
        Ok(SizeRange { min, max })
    }
}

/// The request mix, shared by every connection.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Workload {
    pub protocol: Protocol,
    pub keys: u64,
    pub key_size: usize,
    pub dist: KeyDist,
    pub value_size: SizeRange,
    /// Fraction of requests that are gets.
    pub get_ratio: f64,
    /// Keys per get request.
    pub multiget: usize,
    /// After a get misses, set that key (cache-aside).
    pub set_on_miss: bool,
}

/// What a request in flight was, so its reply can be parsed and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Get { keys: u32 },
    Set,
}

/// Bytes of filler that values are cut from.
const FILLER: &[u8] = &[b'x'; 4096];

impl Workload {
    pub fn check(&self) -> Result<(), String> {
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        let digits = (self.keys - 1).max(1).ilog10() as usize + 1;
        if self.key_size < digits + 1 || self.key_size > 250 {
            return Err(format!(
                "--key-size {} cannot name {} keys (need {}..=250)",
                self.key_size,
                self.keys,
                digits + 1
            ));
        }
        if !(0.0..=1.0).contains(&self.get_ratio) {
            return Err("--get-ratio must be within 0..=1".into());
        }
        if self.multiget == 0 || self.multiget > 100 {
            return Err("--multiget must be within 1..=100".into());
        }
        if self.set_on_miss && self.multiget > 1 {
            return Err("--set-on-miss works with single-key gets only".into());
        }
        if self.value_size.max > 1 << 30 {
            return Err("--value-size is over 1 GiB".into());
        }
        Ok(())
    }

    /// Key `i`: `k` then `i` zero-padded, exactly `key_size` bytes.
    pub fn put_key(&self, out: &mut Vec<u8>, i: u64) {
        out.push(b'k');
        let digits = i.checked_ilog10().unwrap_or(0) as usize + 1;
        out.extend(std::iter::repeat_n(
            b'0',
            (self.key_size - 1).saturating_sub(digits),
        ));
        webvac::protocol::put_u64(out, i);
    }

    pub fn put_get(&self, out: &mut Vec<u8>, keys: &[u64]) {
        match self.protocol {
            Protocol::Text => {
                out.extend_from_slice(b"get");
                for &k in keys {
                    out.push(b' ');
                    self.put_key(out, k);
                }
                out.extend_from_slice(b"\r\n");
            }
            Protocol::Meta if keys.len() == 1 => {
                out.extend_from_slice(b"mg ");
                self.put_key(out, keys[0]);
                out.extend_from_slice(b" v\r\n");
            }
            Protocol::Meta => {
                for &k in keys {
                    out.extend_from_slice(b"mg ");
                    self.put_key(out, k);
                    out.extend_from_slice(b" v q\r\n");
                }
                out.extend_from_slice(b"mn\r\n");
            }
        }
    }

    pub fn put_set(&self, out: &mut Vec<u8>, key: u64, len: usize) {
        let verb: &[u8] = match self.protocol {
            Protocol::Text => b"set ",
            Protocol::Meta => b"ms ",
        };
        out.extend_from_slice(verb);
        self.put_key(out, key);
        match self.protocol {
            Protocol::Text => out.extend_from_slice(format!(" 0 0 {len}\r\n").as_bytes()),
            Protocol::Meta => out.extend_from_slice(format!(" {len}\r\n").as_bytes()),
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(FILLER.len());
            out.extend_from_slice(&FILLER[..n]);
            left -= n;
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Draws keys, sizes and operations for one connection.
pub struct Chooser {
    rng: SmallRng,
    zipf: Option<Zipf<f64>>,
}

impl Chooser {
    pub fn new(w: &Workload, rng: SmallRng) -> Chooser {
        let zipf = match w.dist {
            KeyDist::Uniform => None,
            KeyDist::Zipf(s) => Some(Zipf::new(w.keys, s).expect("checked exponent")),
        };
        Chooser { rng, zipf }
    }

    pub fn key(&mut self, w: &Workload) -> u64 {
        match &self.zipf {
            // Zipf samples ranks 1..=keys.
            Some(z) => (z.sample(&mut self.rng) as u64).clamp(1, w.keys) - 1,
            None => self.rng.gen_range(0..w.keys),
        }
    }

    pub fn value_len(&mut self, w: &Workload) -> usize {
        self.rng.gen_range(w.value_size.min..=w.value_size.max)
    }

    pub fn is_get(&mut self, w: &Workload) -> bool {
        self.rng.gen_bool(w.get_ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(protocol: Protocol) -> Workload {
        Workload {
            protocol,
            keys: 1000,
            key_size: 8,
            dist: KeyDist::Uniform,
            value_size: SizeRange { min: 3, max: 3 },
            get_ratio: 0.9,
            multiget: 1,
            set_on_miss: false,
        }
    }

    #[test]
    fn keys_have_the_asked_size() {
        let w = workload(Protocol::Text);
        let mut out = Vec::new();
        w.put_key(&mut out, 42);
        assert_eq!(out, b"k0000042");
        assert!(Workload { key_size: 3, ..w }.check().is_err());
    }

    #[test]
    fn requests_are_well_formed() {
        let w = workload(Protocol::Text);
        let mut out = Vec::new();
        w.put_get(&mut out, &[1, 2]);
        w.put_set(&mut out, 3, 3);
        assert_eq!(
            out,
            b"get k0000001 k0000002\r\nset k0000003 0 0 3\r\nxxx\r\n"
        );
        let m = workload(Protocol::Meta);
        out.clear();
        m.put_get(&mut out, &[1]);
        m.put_get(&mut out, &[1, 2]);
        m.put_set(&mut out, 3, 3);
        assert_eq!(
            out,
            b"mg k0000001 v\r\nmg k0000001 v q\r\nmg k0000002 v q\r\nmn\r\nms k0000003 3\r\nxxx\r\n"
        );
    }

    #[test]
    fn parses_options() {
        assert_eq!("zipf:0.99".parse::<KeyDist>(), Ok(KeyDist::Zipf(0.99)));
        assert!("zipf:-1".parse::<KeyDist>().is_err());
        assert_eq!(
            "10-20".parse::<SizeRange>(),
            Ok(SizeRange { min: 10, max: 20 })
        );
        assert!("20-10".parse::<SizeRange>().is_err());
    }
}
