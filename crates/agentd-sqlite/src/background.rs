//! Background threads yield to the server's request threads.
//!
//! The writer's ingestion and the WAL checkpoints are bulk work nobody waits for; the async runtime's threads
//! carry every token to its clients. On a small machine they share a CPU, and at equal priority a checkpoint
//! that runs for a few milliseconds takes half the CPU from the token path for that long, which shows up as
//! latency spikes. A lower priority (10 nice levels below the process: about a tenth of the CPU's share while
//! both want it) makes that work run when the runtime waits, which on a machine not at its limit is most of the
//! time. Lowering one's own priority needs no privileges.
//!
//! The step is relative: a process that already runs niced (batch jobs, some CI runners start everything at
//! 19) keeps its background threads at or below its own priority, never above it. Nice values stop at 19.

/// How many nice levels below the process background threads run.
const NICE_STEP: i32 = 10;
/// The lowest priority there is.
const NICE_MAX: i32 = 19;

/// The nice value for a background thread of a process running at `process_nice`.
pub(crate) fn background_nice(process_nice: i32) -> i32 {
    process_nice
        .saturating_add(NICE_STEP)
        .min(NICE_MAX)
        .max(process_nice)
}

/// Lowers the calling thread's scheduling priority to [`background_nice`] of the process's (Linux:
/// `setpriority(PRIO_PROCESS, 0)` changes the calling thread only; the process's nice is its main thread's).
/// Best effort: on failure the thread keeps its priority, which is only slower under load.
#[cfg(target_os = "linux")]
pub(crate) fn lower_priority() {
    use rustix::process::{getpid, getpriority_process, setpriority_process};
    let process = match getpriority_process(Some(getpid())) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "could not read the process's priority");
            return;
        }
    };
    let target = background_nice(process);
    let current = getpriority_process(None).unwrap_or(process);
    if target > current {
        if let Err(e) = setpriority_process(None, target) {
            tracing::debug!(error = %e, "could not lower a background thread's priority");
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::background_nice;

    #[test]
    fn ten_levels_below_the_process_and_never_above_it() {
        assert_eq!(background_nice(0), 10);
        assert_eq!(background_nice(5), 15);
        assert_eq!(background_nice(9), 19);
        assert_eq!(background_nice(15), 19);
        assert_eq!(background_nice(19), 19);
        // A process raised above normal (negative nice) still gets its threads 10 below it.
        assert_eq!(background_nice(-20), -10);
    }
}
