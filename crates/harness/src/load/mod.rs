//! `harness load`: an open-loop load generator for the ingest API.
//!
//! Requests are scheduled at fixed intervals whatever the server does
//! (open loop), and each latency is measured from the moment the request
//! was *scheduled*, so a slow server cannot hide its slowness by slowing
//! the generator down (no coordinated omission). In-flight requests are
//! capped; a request that cannot start on time because of the cap is
//! counted as `late` and still measured from its scheduled time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

use crate::verify::{Ledger, Outcome};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The events URL, with `?token=` when needed.
    pub url: String,
    /// Events per second offered.
    pub rate: u32,
    /// Events per request.
    pub batch: u32,
    pub duration: Duration,
    /// Most requests in flight at once.
    pub max_in_flight: usize,
    /// Simulated students the events are spread over.
    pub students: u32,
    /// Distinct client addresses (127.0.1.1, 127.0.1.2, ...) the requests
    /// come from, as a class's machines would; per-address rate limits
    /// then apply as they would in a classroom.
    pub clients: u8,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub offered_events_per_s: f64,
    pub accepted_events_per_s: f64,
    pub requests: u64,
    pub late_starts: u64,
    pub status_counts: BTreeMap<String, u64>,
    pub latency_ms: Percentiles,
    pub wall_s: f64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
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

struct Tally {
    histogram: Histogram<u64>,
    statuses: BTreeMap<String, u64>,
    accepted_events: u64,
    ledger: Ledger,
}

/// A request body of `batch` events and their ids.
fn body(batch: u32, students: u32, seq: u64) -> (String, Vec<uuid::Uuid>) {
    // Sent now, as the extension would stamp it.
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut ids = Vec::with_capacity(batch as usize);
    let events: Vec<String> = (0..u64::from(batch))
        .map(|i| {
            let n = seq * u64::from(batch) + i;
            let id = uuid::Uuid::new_v4();
            ids.push(id);
            format!(
                r#"{{"eventId":"{}","eventType":"cell_executed","eventTime":"{}","emailAddress":"student{:04}@example.ac.jp","userName":"学生 {}","teamName":"チーム{}","notebookPath":"lesson1/intro.ipynb","cellId":"cell-{}","cellType":"code","code":"import numpy as np\nx = np.arange(10)\nprint(x.sum())","executionCount":{},"hasError":{},"result":"45","executionDurationMs":12.5}}"#,
                id,
                now,
                n % u64::from(students.max(1)),
                n % u64::from(students.max(1)),
                n % 12,
                n % 20,
                n % 1000,
                n.is_multiple_of(7)
            )
        })
        .collect();
    (format!("[{}]", events.join(",")), ids)
}

/// Runs the load and reports, with the ledger of every event sent. Prints
/// a progress line every second to stderr.
pub async fn run(spec: LoadSpec) -> anyhow::Result<(LoadReport, Ledger)> {
    anyhow::ensure!(
        spec.rate > 0 && spec.batch > 0,
        "rate and batch must be positive"
    );
    let clients: Vec<reqwest::Client> = (1..=spec.clients.max(1))
        .map(|k| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .local_address(std::net::IpAddr::from([127, 0, 1, k]))
                .build()
        })
        .collect::<Result<_, _>>()?;
    let tally = Arc::new(Mutex::new(Tally {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        statuses: BTreeMap::new(),
        accepted_events: 0,
        ledger: Ledger::new(),
    }));
    let permits = Arc::new(Semaphore::new(spec.max_in_flight));
    let requests_per_s = f64::from(spec.rate) / f64::from(spec.batch);
    let interval = Duration::from_secs_f64(1.0 / requests_per_s);
    let total = (spec.duration.as_secs_f64() * requests_per_s).round() as u64;
    let started = Instant::now();
    let mut late = 0u64;
    let mut tasks = Vec::with_capacity(total as usize);
    let mut next_progress = Duration::from_secs(1);
    for seq in 0..total {
        let scheduled = started + interval.mul_f64(seq as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                late += 1;
                Arc::clone(&permits).acquire_owned().await?
            }
        };
        let http = clients[(seq % clients.len() as u64) as usize].clone();
        let url = spec.url.clone();
        let task_tally = Arc::clone(&tally);
        let (payload, ids) = body(spec.batch, spec.students, seq);
        let batch = u64::from(spec.batch);
        tasks.push(tokio::spawn(async move {
            let result = http
                .post(&url)
                .header("content-type", "application/json")
                .body(payload)
                .send()
                .await;
            let micros = scheduled.elapsed().as_micros().max(1) as u64;
            let (status, outcome) = match result {
                Ok(response) => {
                    let status = response.status();
                    let outcome = if status.is_success() {
                        Outcome::Ok
                    } else {
                        Outcome::Fail
                    };
                    let _ = response.bytes().await;
                    (status.as_u16().to_string(), outcome)
                }
                Err(_) => ("error".to_owned(), Outcome::Unknown),
            };
            let mut tally = task_tally.lock().await;
            for id in ids {
                tally.ledger.record(id, outcome);
            }
            let _ = tally.histogram.record(micros.min(60_000_000));
            if status == "202" {
                tally.accepted_events += batch;
            }
            *tally.statuses.entry(status).or_default() += 1;
            drop(permit);
        }));
        if started.elapsed() >= next_progress {
            let accepted = tally.lock().await.accepted_events;
            eprintln!(
                "  {:>3.0} s  {seq:>7}/{total} requests  {:>8.0} events/s accepted",
                started.elapsed().as_secs_f64(),
                accepted as f64 / started.elapsed().as_secs_f64()
            );
            next_progress += Duration::from_secs(1);
        }
    }
    for task in tasks {
        task.await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let mut tally = tally.lock().await;
    let ledger = std::mem::take(&mut tally.ledger);
    let report = LoadReport {
        offered_events_per_s: f64::from(spec.rate),
        accepted_events_per_s: tally.accepted_events as f64 / wall,
        requests: total,
        late_starts: late,
        status_counts: tally.statuses.clone(),
        latency_ms: Percentiles::from_micros(&tally.histogram),
        wall_s: wall,
    };
    Ok((report, ledger))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_valid_batches_of_the_wire_format() {
        let (text, ids) = body(3, 100, 7);
        let items: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0]["eventType"], "cell_executed");
        assert_eq!(items[0]["emailAddress"], "student0021@example.ac.jp");
        assert_eq!(items[2]["eventId"], ids[2].to_string());
    }
}
