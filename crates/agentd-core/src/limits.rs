//! Per-principal limits (SPEC.md section 9): how many messages a principal may send per minute
//! (`server.rate_limit_per_min`) and how many WebSockets and SSE streams it may hold open at once
//! (`server.max_streams_per_principal`). Accounted here, once, for every surface: `Agentd::send` asks
//! [`Limits::try_send`], and every stream handler holds a [`StreamGuard`] from [`Limits::open_stream`] for as
//! long as its stream lives.
//!
//! - **Messages**: a sliding window. A principal may send at most N messages in any 60 seconds; the window
//!   keeps the times of its accepted sends (at most N of them), so `Retry-After` is exact: the time until the
//!   oldest send leaves the window. Refused sends are not recorded (hammering does not push the window).
//! - **Streams**: a count per principal; the guard decrements it when dropped, whatever ends the stream.
//!
//! Memory is bounded: principals come from the configured keys, a principal's window holds at most N instants,
//! and entries with nothing to remember (an empty window, no open stream) are removed.
//! The std mutexes guard only map lookups; nothing awaits while holding them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The window `rate_limit_per_min` counts in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Windows are swept for idle principals when the map holds more than this many.
const SWEEP_AT: usize = 256;

/// A refusal: what to tell the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over `rate_limit_per_min`; retry after this many whole seconds (at least 1).
    Rate { limit: u32, retry_after_s: u64 },
    /// Over `max_streams_per_principal`.
    Streams { limit: u32 },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Rate {
                limit,
                retry_after_s,
            } => write!(
                f,
                "rate limit reached: at most {limit} messages per minute; retry in {retry_after_s} s"
            ),
            Refused::Streams { limit } => write!(
                f,
                "too many open streams: at most {limit} WebSockets and SSE streams per principal"
            ),
        }
    }
}

/// The accounting. Cheap to call when a limit is off (no lock is taken).
#[derive(Debug)]
pub struct Limits {
    rate_per_min: Option<u32>,
    max_streams: Option<u32>,
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    streams: Arc<StreamCounts>,
}

/// Open streams per principal (principals with none are absent).
type StreamCounts = Mutex<HashMap<String, u32>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves a consistent map (every update is a single step).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limits {
    /// `None` is no limit.
    pub fn new(rate_per_min: Option<u32>, max_streams: Option<u32>) -> Limits {
        Limits {
            rate_per_min,
            max_streams,
            windows: Mutex::new(HashMap::new()),
            streams: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Records a send of `principal` if its window has room; otherwise says when to retry.
    pub fn try_send(&self, principal: &str) -> Result<(), Refused> {
        self.try_send_at(principal, Instant::now())
    }

    fn try_send_at(&self, principal: &str, now: Instant) -> Result<(), Refused> {
        let Some(limit) = self.rate_per_min else {
            return Ok(());
        };
        let mut windows = lock(&self.windows);
        if windows.len() > SWEEP_AT && !windows.contains_key(principal) {
            windows.retain(|_, w| w.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
        }
        let window = windows.entry(principal.to_string()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            window.pop_front();
        }
        if window.len() >= limit as usize {
            let oldest = window.front().copied().unwrap_or(now);
            let wait = WINDOW.saturating_sub(now.duration_since(oldest));
            // Whole seconds, rounded up: a client that waits that long is let through.
            let retry_after_s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(Refused::Rate {
                limit,
                retry_after_s: retry_after_s.max(1),
            });
        }
        window.push_back(now);
        Ok(())
    }

    /// Opens a stream for `principal`, or refuses when it already holds `max_streams_per_principal`.
    /// The stream counts until the guard is dropped.
    pub fn open_stream(&self, principal: &str) -> Result<StreamGuard, Refused> {
        let Some(limit) = self.max_streams else {
            return Ok(StreamGuard { held: None });
        };
        let mut streams = lock(&self.streams);
        let open = streams.entry(principal.to_string()).or_insert(0);
        if *open >= limit {
            if *open == 0 {
                streams.remove(principal);
            }
            return Err(Refused::Streams { limit });
        }
        *open += 1;
        Ok(StreamGuard {
            held: Some((self.streams.clone(), principal.to_string())),
        })
    }

    /// The streams `principal` holds open now (0 when streams are not limited, as they are not counted then).
    pub fn open_streams(&self, principal: &str) -> u32 {
        lock(&self.streams).get(principal).copied().unwrap_or(0)
    }
}

/// One open stream of a principal; dropping it gives the slot back.
#[derive(Debug)]
#[must_use = "the stream counts only while its guard is held"]
pub struct StreamGuard {
    held: Option<(Arc<StreamCounts>, String)>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some((streams, principal)) = self.held.take() {
            let mut streams = lock(&streams);
            if let Some(open) = streams.get_mut(&principal) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    streams.remove(&principal);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_admits_n_per_minute_and_names_the_wait() {
        let l = Limits::new(Some(3), None);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(l.try_send_at("a", t0 + Duration::from_secs(i * 10)), Ok(()));
        }
        // At t0+25 the oldest send (t0) leaves the window at t0+60: 35 s to wait.
        assert_eq!(
            l.try_send_at("a", t0 + Duration::from_secs(25)),
            Err(Refused::Rate {
                limit: 3,
                retry_after_s: 35
            })
        );
        // Refusals are not recorded, and other principals have their own window.
        assert_eq!(l.try_send_at("b", t0 + Duration::from_secs(25)), Ok(()));
        assert_eq!(l.try_send_at("a", t0 + Duration::from_secs(60)), Ok(()));
        assert!(l.try_send_at("a", t0 + Duration::from_secs(61)).is_err());
        assert_eq!(l.try_send_at("a", t0 + Duration::from_secs(70)), Ok(()));
        let half = t0 + Duration::from_millis(70_500);
        assert_eq!(
            l.try_send_at("a", half),
            Err(Refused::Rate {
                limit: 3,
                retry_after_s: 10
            })
        );
    }

    #[test]
    fn no_limit_is_free() {
        let l = Limits::new(None, None);
        for _ in 0..10_000 {
            assert!(l.try_send("a").is_ok());
        }
        assert!(lock(&l.windows).is_empty());
        let g: Vec<StreamGuard> = (0..100).map(|_| l.open_stream("a").unwrap()).collect();
        assert_eq!(g.len(), 100);
        assert!(lock(&l.streams).is_empty());
    }

    #[test]
    fn idle_principals_are_swept() {
        let l = Limits::new(Some(1), None);
        let t0 = Instant::now();
        for i in 0..=SWEEP_AT {
            l.try_send_at(&format!("p{i}"), t0).unwrap();
        }
        l.try_send_at("late", t0 + WINDOW).unwrap();
        assert_eq!(lock(&l.windows).len(), 1);
    }

    #[test]
    fn streams_count_until_their_guard_drops() {
        let l = Limits::new(None, Some(2));
        let a = l.open_stream("alice").unwrap();
        let b = l.open_stream("alice").unwrap();
        assert_eq!(
            l.open_stream("alice").unwrap_err(),
            Refused::Streams { limit: 2 }
        );
        let other = l.open_stream("bob").unwrap();
        assert_eq!(l.open_streams("alice"), 2);
        drop(a);
        let c = l.open_stream("alice").unwrap();
        drop((b, c, other));
        assert!(lock(&l.streams).is_empty());
    }
}
