//! Capped exponential backoff, and a pause that shutdown cuts short.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Capped exponential backoff.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Sleeps `pause`, or less if `stop` is cancelled; returns whether to stop.
pub(crate) async fn pause_or_stop(pause: Duration, stop: &CancellationToken) -> bool {
    if stop.is_cancelled() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(pause) => stop.is_cancelled(),
        () = stop.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let pauses: Vec<u128> = (0..4).map(|_| b.next().as_millis()).collect();
        assert_eq!(pauses, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }
}
