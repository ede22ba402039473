//! Background threads yield to the server's request threads.
//!
//! The writer's ingestion and the WAL checkpoints are bulk work nobody waits for; the async runtime's threads
//! carry every token to its clients. On a small machine they share a CPU, and at equal priority a checkpoint
//! that runs for a few milliseconds takes half the CPU from the token path for that long, which shows up as
//! latency spikes. A lower priority (nice 10: about a tenth of the CPU's share while both want it) makes that
//! work run when the runtime waits, which on a machine not at its limit is most of the time. Lowering one's own
//! priority needs no privileges.

/// The nice value background threads take.
const NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority (Linux: `setpriority` on a thread id changes that thread
/// only). Best effort: on failure the thread keeps its priority, which is only slower under load.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn lower_priority() {
    use std::os::raw::{c_int, c_uint};
    extern "C" {
        fn setpriority(which: c_int, who: c_uint, prio: c_int) -> c_int;
    }
    const PRIO_PROCESS: c_int = 0;
    // SAFETY: a plain system call on integers; `who = 0` is the calling thread.
    let rc = unsafe { setpriority(PRIO_PROCESS, 0, NICE) };
    if rc != 0 {
        tracing::debug!("could not lower a background thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn lower_priority() {}
