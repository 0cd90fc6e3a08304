//! The node's clock and partition faults (`[faults] clock_offset_ms`,
//! `clock_rate`, `drop_peers`, `control`): set up at start, changed by the
//! `fault` command, reported by `stats`. For testing only.
//!
//! ```text
//!  fault clock_offset_ms │ clock_rate ──▶ FaultClock (what the store reads)
//!  fault drop_peers ─────────────────────▶ TransportStats::blocked (every peer link)
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::fault_clock::FaultClock;
use crate::cluster::coordinator::Cluster;
use crate::config::{ClusterConfig, FaultsConfig};
use crate::protocol::fault::FaultCmd;
use crate::protocol::stats::put_stat;
use crate::protocol::{put_line, reply};
use crate::store::Clock;

/// What the `fault` command may change, and whether it may.
#[derive(Debug)]
pub struct FaultControl {
    /// Whether the `fault` command is accepted (`control`).
    enabled: bool,
    /// Whether `stats` reports the settings: `control` is on, or a clock or
    /// partition fault was configured.
    reported: bool,
    /// The skewed clock the store reads, when a clock fault is configured
    /// or `control` is on; `None` otherwise (the store reads the real one).
    clock: Option<Arc<FaultClock>>,
    /// The other members of the cluster: the ids `drop_peers` accepts.
    cluster: Option<ClusterConfig>,
}

impl FaultControl {
    /// The node's faults as configured, and the clock its store must read:
    /// `clock` itself unless a clock fault or `control` asks for the
    /// skewed one.
    pub fn new(
        faults: &FaultsConfig,
        cluster: Option<&ClusterConfig>,
        clock: Arc<dyn Clock>,
    ) -> (Self, Arc<dyn Clock>) {
        let skewed = faults.clock_any().then(|| {
            Arc::new(FaultClock::new(
                clock.clone(),
                faults.clock_offset_ms,
                faults.clock_rate,
            ))
        });
        let clock: Arc<dyn Clock> = match &skewed {
            Some(s) => s.clone(),
            None => clock,
        };
        let control = Self {
            enabled: faults.control,
            reported: faults.clock_any() || !faults.drop_peers.is_empty(),
            clock: skewed,
            cluster: cluster.cloned(),
        };
        (control, clock)
    }

    /// The skewed clock, if the store reads one.
    pub fn clock(&self) -> Option<&Arc<FaultClock>> {
        self.clock.as_ref()
    }

    /// Runs a `fault` command and appends its reply: `ERROR` unless
    /// `control` is on (an unknown command, as on memcached), `CLIENT_ERROR
    /// bad command line format` for a malformed line or a value out of
    /// range, else `OK`.
    pub fn execute(&self, cmd: Option<FaultCmd>, cluster: Option<&Cluster>, out: &mut Vec<u8>) {
        if !self.enabled {
            return put_line(out, reply::ERROR.as_bytes());
        }
        let clock = self.clock.as_ref().expect("control always wraps the clock");
        let applied = match cmd {
            None => Err(String::new()),
            Some(FaultCmd::ClockOffsetMs(ms)) => {
                FaultsConfig::check_clock_offset_ms(ms).map(|()| clock.set_offset_ms(ms))
            }
            Some(FaultCmd::ClockRate(rate)) => {
                FaultsConfig::check_clock_rate(rate).map(|()| clock.set_rate(rate))
            }
            Some(FaultCmd::LayoutQuorums(r, w)) => match cluster {
                Some(c) => c
                    .bump_quorums(usize::from(r), usize::from(w))
                    .map(|epoch| tracing::warn!(epoch, "fault injection installed a layout")),
                None => Err("not a cluster member".into()),
            },
            // Against the layout installed now, not the configured list: a
            // node that joined lists only itself, and members come and go.
            Some(FaultCmd::DropPeers(ids)) => match (cluster, self.cluster.as_ref()) {
                (Some(c), Some(config)) => {
                    match ids
                        .iter()
                        .find(|&&id| id == config.node_id || !c.is_member(id))
                    {
                        Some(id) => Err(format!("{id} is not another member")),
                        None => {
                            c.transport.blocked.set(&ids);
                            Ok(())
                        }
                    }
                }
                _ => FaultsConfig::check_drop_peers(&ids, None),
            },
        };
        match applied {
            Ok(()) => {
                tracing::warn!(settings = ?self.settings(cluster), "fault injection changed");
                put_line(out, b"OK");
            }
            Err(_) => put_line(out, reply::BAD_FORMAT.as_bytes()),
        }
    }

    /// `STAT fault_*` lines for `stats`, when there is anything to report.
    pub fn compose_stats(&self, cluster: Option<&Cluster>, out: &mut Vec<u8>) {
        if !self.reported && !self.enabled {
            return;
        }
        let s = self.settings(cluster);
        put_stat(out, "fault_control", u8::from(self.enabled));
        put_stat(out, "fault_clock_offset_ms", s.clock_offset_ms);
        put_stat(out, "fault_clock_rate", s.clock_rate);
        put_stat(out, "fault_clock_skew_ms", s.clock_skew_ms);
        put_stat(out, "fault_drop_peers", &s.drop_peers);
        put_stat(out, "fault_peer_frames_dropped", s.frames_dropped);
    }

    fn settings(&self, cluster: Option<&Cluster>) -> Settings {
        let (clock_offset_ms, clock_rate, clock_skew_ms) = self
            .clock
            .as_ref()
            .map_or((0, 1.0, 0), |c| (c.offset_ms(), c.rate(), c.skew_ms()));
        let (drop_peers, frames_dropped) = cluster.map_or((Vec::new(), 0), |c| {
            let t = &c.transport;
            (t.blocked.ids(), t.frames_dropped_fault.load(Relaxed))
        });
        Settings {
            clock_offset_ms,
            clock_rate,
            clock_skew_ms,
            drop_peers: crate::protocol::fault::ids_text(&drop_peers),
            frames_dropped,
        }
    }
}

/// The fault settings in force, as `stats` shows them.
#[derive(Debug)]
struct Settings {
    clock_offset_ms: i64,
    clock_rate: f64,
    /// The offset plus the drift gained since it was set.
    clock_skew_ms: i64,
    /// `2,3`, or `-` for none.
    drop_peers: String,
    frames_dropped: u64,
}
