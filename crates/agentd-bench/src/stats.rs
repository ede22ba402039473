//! Small statistics helpers: percentiles of latency samples.

/// Percentiles of a sample set, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

/// The `q` quantile (0..=1) of sorted samples, nearest-rank.
pub fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises samples given in microseconds (sorts them in place).
pub fn summarize_us(samples: &mut [u32]) -> Summary {
    samples.sort_unstable();
    let ms = |us: u32| f64::from(us) / 1000.0;
    Summary {
        count: samples.len(),
        p50_ms: ms(quantile(samples, 0.50)),
        p99_ms: ms(quantile(samples, 0.99)),
        max_ms: ms(samples.last().copied().unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u32> = (1..=100).rev().map(|x| x * 1000).collect();
        let s = summarize_us(&mut v);
        assert_eq!(
            (s.count, s.p50_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(quantile(&[7], 0.99), 7);
    }
}
