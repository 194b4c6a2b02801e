//! What a load run records: per phase, an HDR histogram of accept latency
//! and answers by status, and per second of the run, events offered,
//! accepted and refused. (End-to-end latencies are kept with the runs they
//! time, in `subscriber::Pending`.)

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies up to a minute, 3 significant digits, in microseconds.
const MAX_MICROS: u64 = 60_000_000;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn from_micros(histogram: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50: ms(histogram.value_at_quantile(0.50)),
            p95: ms(histogram.value_at_quantile(0.95)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

/// An empty latency histogram.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant bounds are valid")
}

/// Records `latency` (clamped to the histogram's range).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
    // In range by the clamp.
    let _ = histogram.record(micros);
}

/// One phase's tally.
#[derive(Debug, Clone)]
pub struct PhaseTally {
    /// From the scheduled instant of a POST to its answer.
    pub accept: Histogram<u64>,
    /// Answers by status code (`error` for no answer).
    pub statuses: BTreeMap<String, u64>,
    /// Events sent.
    pub sent: u64,
    /// Events the server accepted (2xx).
    pub accepted: u64,
    /// Events refused or unanswered.
    pub failed: u64,
    /// When the last answer came, from the phase's start.
    pub last_answer: Duration,
}

impl Default for PhaseTally {
    fn default() -> Self {
        Self {
            accept: histogram(),
            statuses: BTreeMap::new(),
            sent: 0,
            accepted: 0,
            failed: 0,
            last_answer: Duration::ZERO,
        }
    }
}

impl PhaseTally {
    /// One answer: its status (`None`: no answer) and latency.
    pub fn answer(&mut self, status: Option<u16>, latency: Duration, at: Duration) {
        self.sent += 1;
        record(&mut self.accept, latency);
        let key = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        *self.statuses.entry(key).or_default() += 1;
        if status.is_some_and(|s| (200..300).contains(&s)) {
            self.accepted += 1;
        } else {
            self.failed += 1;
        }
        self.last_answer = self.last_answer.max(at);
    }

    /// Refused or unanswered share of events sent.
    pub fn error_rate(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.failed as f64 / self.sent as f64
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Second {
    /// Events due in this second.
    pub offered: u64,
    /// Events whose 2xx answer came in this second.
    pub accepted: u64,
    /// Events refused or unanswered in this second.
    pub failed: u64,
}

/// Per-second counts over the whole run.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    seconds: Vec<Second>,
}

impl Timeline {
    fn slot(&mut self, at: Duration) -> &mut Second {
        let i = at.as_secs() as usize;
        if self.seconds.len() <= i {
            self.seconds.resize(i + 1, Second::default());
        }
        &mut self.seconds[i]
    }

    pub fn offered(&mut self, at: Duration) {
        self.slot(at).offered += 1;
    }

    pub fn answered(&mut self, at: Duration, accepted: bool) {
        let slot = self.slot(at);
        if accepted {
            slot.accepted += 1;
        } else {
            slot.failed += 1;
        }
    }

    pub fn seconds(&self) -> &[Second] {
        &self.seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut tally = PhaseTally::default();
        for n in 1..=1000 {
            tally.answer(Some(202), ms(n), ms(n));
        }
        let p = Percentiles::from_micros(&tally.accept);
        // Three significant digits: within 0.1 %.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(p.p50, 500.0), "{p:?}");
        assert!(close(p.p95, 950.0), "{p:?}");
        assert!(close(p.p99, 990.0), "{p:?}");
        assert!(close(p.max, 1000.0), "{p:?}");
    }

    #[test]
    fn a_tally_of_mixed_answers() {
        let mut tally = PhaseTally::default();
        for n in 0..5000u64 {
            // Very different latencies and answers in one phase.
            let (latency, status) = if n % 3 == 0 {
                (ms(400 + n % 700), Some(503))
            } else {
                (ms(1 + n % 40), Some(202))
            };
            tally.answer(status, latency, ms(n));
        }
        assert_eq!(tally.statuses["202"], 3333);
        assert_eq!(tally.statuses["503"], 1667);
        assert_eq!(
            (tally.sent, tally.accepted, tally.failed),
            (5000, 3333, 1667)
        );
        assert_eq!(tally.last_answer, ms(4999));
        assert!((tally.error_rate() - 1667.0 / 5000.0).abs() < 1e-12);
        // A third of the answers are slow: p50 fast, p95 slow.
        let p = Percentiles::from_micros(&tally.accept);
        assert!(p.p50 < 41.0 && p.p95 >= 400.0, "{p:?}");
    }

    #[test]
    fn unanswered_requests_count_as_errors_and_out_of_range_latencies_are_kept() {
        let mut tally = PhaseTally::default();
        tally.answer(None, Duration::from_secs(3600), ms(1));
        tally.answer(Some(429), Duration::ZERO, ms(2));
        assert_eq!(tally.statuses["error"], 1);
        assert_eq!(tally.statuses["429"], 1);
        assert_eq!(tally.failed, 2);
        assert_eq!(tally.accept.len(), 2);
        // Kept at the histogram's top (a minute), within its precision.
        let max = Percentiles::from_micros(&tally.accept).max;
        assert!((max - 60_000.0).abs() <= 60.0, "{max}");
    }

    #[test]
    fn the_timeline_counts_per_second() {
        let mut timeline = Timeline::default();
        timeline.offered(ms(10));
        timeline.offered(ms(999));
        timeline.offered(ms(2500));
        timeline.answered(ms(1200), true);
        timeline.answered(ms(2600), false);
        assert_eq!(
            timeline.seconds(),
            &[
                Second {
                    offered: 2,
                    accepted: 0,
                    failed: 0
                },
                Second {
                    offered: 0,
                    accepted: 1,
                    failed: 0
                },
                Second {
                    offered: 1,
                    accepted: 0,
                    failed: 1
                },
            ]
        );
    }
}
