//! The open-loop dispatcher: each arrival starts at its scheduled time,
//! whatever earlier requests are doing.
//!
//! The request is handed its *scheduled* instant, and latency is measured
//! from there, so a slow server cannot hide its slowness by slowing the
//! generator down (no coordinated omission). In-flight requests are capped
//! so a dead server cannot exhaust the machine; an arrival that has to wait
//! for the cap is counted as late, and is still measured from its scheduled
//! instant.
//!
//! Time is tokio's clock, so tests run the dispatcher on a paused (mocked)
//! clock.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::behaviour::Arrival;

/// What the dispatcher did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dispatched {
    /// Arrivals started.
    pub started: u64,
    /// Arrivals that could not start on time because of the in-flight cap.
    pub late: u64,
}

/// Starts `send(arrival, scheduled)` for each arrival at `start +
/// arrival.at`, at most `max_in_flight` at once (at least 1, as
/// `LoadSpec` is checked), until `arrivals` ends or `limit` arrivals
/// started; returns once all of them finished.
pub async fn dispatch<I, F, Fut>(
    start: Instant,
    arrivals: I,
    max_in_flight: usize,
    limit: u64,
    mut send: F,
) -> Dispatched
where
    I: Iterator<Item = Arrival>,
    F: FnMut(Arrival, Instant) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut tasks = JoinSet::new();
    let mut done = Dispatched::default();
    for arrival in arrivals {
        if done.started >= limit {
            break;
        }
        let scheduled = start + arrival.at;
        tokio::time::sleep_until(scheduled).await;
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                done.late += 1;
                match Arc::clone(&permits).acquire_owned().await {
                    Ok(permit) => permit,
                    // The semaphore is never closed.
                    Err(_) => break,
                }
            }
        };
        let request = send(arrival, scheduled);
        tasks.spawn(async move {
            request.await;
            drop(permit);
        });
        done.started += 1;
        // Finished tasks go now, so memory follows what is in flight.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    done
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::super::behaviour::Action;
    use super::*;

    fn every(ms: u64, n: u64) -> impl Iterator<Item = Arrival> {
        (0..n).map(move |i| Arrival {
            at: Duration::from_millis(ms * i),
            student: i as u32,
            action: Action::OpenNotebook { notebook: 1 },
        })
    }

    /// Each request records (when it was due, when it started) relative to
    /// the start, then takes `service` to answer.
    async fn run(
        n: u64,
        cap: usize,
        service: Duration,
    ) -> (Dispatched, Vec<(Duration, Duration)>, Duration) {
        let start = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let done = dispatch(start, every(100, n), cap, u64::MAX, |_, scheduled| {
            let log = Arc::clone(&log);
            let began = Instant::now();
            async move {
                log.lock().unwrap().push((scheduled - start, began - start));
                tokio::time::sleep(service).await;
            }
        })
        .await;
        let log = log.lock().unwrap().clone();
        (done, log, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_server_does_not_delay_the_next_arrivals() {
        // Every answer takes 5 s, 50 times the interval: a closed loop
        // would send 1 request per 5 s; the open loop keeps the schedule.
        let (done, log, elapsed) = run(20, 1000, Duration::from_secs(5)).await;
        assert_eq!(
            done,
            Dispatched {
                started: 20,
                late: 0
            }
        );
        for (i, (due, began)) in log.iter().enumerate() {
            assert_eq!(*due, Duration::from_millis(100 * i as u64));
            assert_eq!(began, due, "request {i} started late");
        }
        // The last one was due at 1.9 s and took 5 s.
        assert_eq!(elapsed, Duration::from_millis(6900));
    }

    #[tokio::test(start_paused = true)]
    async fn the_in_flight_cap_makes_arrivals_late_but_keeps_their_due_time() {
        let (done, log, _) = run(10, 2, Duration::from_secs(1)).await;
        assert_eq!(done.started, 10);
        assert_eq!(done.late, 8);
        // Due times are still the schedule's, so latency counts the wait.
        let dues: Vec<Duration> = log.iter().map(|(due, _)| *due).collect();
        assert_eq!(
            dues,
            (0..10)
                .map(|i| Duration::from_millis(100 * i))
                .collect::<Vec<_>>()
        );
        assert!(log.iter().skip(2).all(|(due, began)| began > due));
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_bounds_the_count() {
        let start = Instant::now();
        let done = dispatch(start, every(10, 100), 8, 30, |_, _| async {}).await;
        assert_eq!(done.started, 30);
    }
}
