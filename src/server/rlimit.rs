//! The open-file limit: every client connection is a file descriptor, so a
//! `max_connections` the process cannot open would leave clients hanging in
//! the accept queue instead of getting `ERROR Too many open connections`.
//! Like memcached, raise the soft limit at startup, or refuse to start.

use crate::error::ServerError;

/// Descriptors the server needs besides client connections: the listener,
/// stdio, the runtime's epoll and wakers, log output.
pub const FDS_RESERVED: u64 = 64;

/// Makes sure `max_connections` clients can be open at once. Returns the
/// soft limit now in force.
///
/// # Errors
/// If the hard limit is too low, with a message naming both remedies.
pub fn ensure_open_files(max_connections: usize) -> Result<u64, ServerError> {
    let needed = max_connections as u64 + FDS_RESERVED;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; no other memory.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(ServerError::Io(std::io::Error::last_os_error()));
    }
    if lim.rlim_cur >= needed {
        return Ok(lim.rlim_cur);
    }
    if lim.rlim_max < needed {
        return Err(ServerError::Config(format!(
            "max_connections {max_connections} needs {needed} open files but the hard limit is {}: \
             lower max_connections (-c) or raise the limit (ulimit -Hn)",
            lim.rlim_max
        )));
    }
    let raised = libc::rlimit {
        rlim_cur: needed,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(ServerError::Config(format!(
            "cannot raise the open-file limit to {needed} for max_connections {max_connections}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(needed)
}

/// Limits glibc's malloc to one arena for the whole process.
///
/// glibc gives each thread that allocates its own arena. A connection task
/// that moves between worker threads then frees items into one arena while
/// new items come from another, and freed memory cannot be reused across
/// them: filling a 64 MiB cache with tiny items and then with 100 KB ones
/// peaked at 125–131 MiB of RSS with the default arenas and at 84 MiB with
/// one (`tests/memory.rs`). Item allocations already serialise on shard
/// locks, so one arena costs little. Call it before any thread starts.
/// Does nothing on other C libraries.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before the
    // runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
