//! Process figures from `/proc`: CPU seconds, resident memory, the open-files limit, CPU affinity.
//!
//! A server may run helper processes (uvicorn `--workers` forks them), so CPU and RSS are summed over the
//! process and all its descendants, as the peer's `quick_bench.py` does.

use std::sync::OnceLock;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, 100 on Linux in practice).
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// `pid` and all its descendants.
pub fn tree_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        out.push(p);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = task.path().join("children");
            if let Ok(text) = std::fs::read_to_string(children) {
                todo.extend(
                    text.split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// User + system CPU seconds of one process (all its threads, live and exited).
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; the fields after it are fixed.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// User + system CPU seconds of `pid` and its descendants; 0 if it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    tree_pids(pid)
        .into_iter()
        .filter_map(process_cpu_seconds)
        .sum()
}

/// CPU seconds of this process, its reaped children (cutime + cstime) and its live descendants: everything
/// the bench itself (servers, mock, load generator, builds) has used.
pub fn own_total_cpu_seconds() -> f64 {
    let me = std::process::id();
    let reaped = std::fs::read_to_string(format!("/proc/{me}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1.to_string();
            let fields: Vec<&str> = after.split_whitespace().collect();
            let cutime: u64 = fields.get(13)?.parse().ok()?;
            let cstime: u64 = fields.get(14)?.parse().ok()?;
            Some((cutime + cstime) as f64 / clock_ticks())
        })
        .unwrap_or(0.0);
    cpu_seconds(me) + reaped
}

/// Busy CPU seconds of the whole machine since boot (all CPUs, from the `cpu` line of /proc/stat).
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
    let busy = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| v.get(i))
        .sum::<u64>();
    Some(busy as f64 / clock_ticks())
}

/// Resident set size of one process, in KiB.
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident set size of `pid` and its descendants, in KiB; 0 if it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    tree_pids(pid).into_iter().filter_map(process_rss_kib).sum()
}

/// Whether the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// This process's soft limit on open files.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The CPUs this process may run on, as `/proc/self/status` lists them (e.g. `1` or `0-1`).
pub fn allowed_cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Number of CPUs online in the machine (not the ones this process may use: it pins itself).
pub fn online_cpus() -> usize {
    let per_cpu = std::fs::read_to_string("/proc/stat")
        .map(|s| {
            s.lines()
                .filter(|l| {
                    l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
                })
                .count()
        })
        .unwrap_or(0);
    if per_cpu > 0 {
        per_cpu
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_rss() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(rss_kib(me) > 0);
        // Busy until /proc shows 50 ms more CPU, or 30 s pass: on a loaded machine (the test command runs
        // other suites beside this one) a busy loop may get a small share of a core, so the loop is bounded
        // by CPU shown, not by wall time.
        let before = cpu_seconds(me);
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_seconds(me) - before <= 0.05 && t.elapsed().as_secs() < 30 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        assert!(
            cpu_seconds(me) - before > 0.05,
            "30 s of busy looping never showed as 50 ms of CPU time"
        );
        assert!(open_files_limit().is_some_and(|n| n > 0));
        assert!(online_cpus() >= 1);
        assert!(machine_busy_seconds().is_some_and(|s| s > 0.0));
        assert!(own_total_cpu_seconds() >= cpu_seconds(me));
    }
}
