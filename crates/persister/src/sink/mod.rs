//! The sinks: each writes batches of events to one backend, behind one
//! trait, so the consume loop ([`crate::worker`]) is written once.
//!
//! * [`postgres`]: one transaction per batch, then the derived-status step;
//! * [`influx`]: one `/write` per batch.
//!
//! A sink sorts its failures by what to do about them ([`SinkError`]): a
//! refusal of the data itself is final (the worker halves the batch until
//! the refused entry is alone and dead-letters it), anything else is an
//! outage of the environment, and the batch is retried.

pub(crate) mod influx;
pub(crate) mod postgres;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cellmon_domain::envelope::StreamEvent;
use cellmon_store::StoreError;

use crate::status::StatusError;

/// One backend the events are written to. Its name is its consumer group
/// and its `sink` label in metrics, logs and readiness.
pub(crate) trait Sink: Send + 'static {
    fn name(&self) -> &'static str;

    /// What must be done before consuming (migrate; create the database);
    /// retried until it succeeds.
    fn prepare(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Writes a batch and returns once the backend committed it.
    fn write(
        &mut self,
        batch: &[StreamEvent],
    ) -> impl Future<Output = Result<Written, SinkError>> + Send;

    /// A check the readiness route runs: whether the backend answers now,
    /// within the sink's own timeout.
    fn probe(&self) -> Probe;
}

/// What writing a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Written {
    /// Events newly stored.
    pub(crate) stored: u64,
    /// Events the backend already held (retries, replays, repeats).
    pub(crate) duplicates: u64,
}

/// A sink failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SinkError {
    #[error("the backend failed or refused")]
    Store(#[from] StoreError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the batch is committed, but its derived status was not published")]
    Status(#[source] StatusError),
}

impl SinkError {
    /// Whether the same batch may succeed later. Only a refusal of the data
    /// is final.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Store(error) => error.is_transient(),
            Self::Timeout(_) => true,
            Self::Status(error) => error.is_transient(),
        }
    }
}

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send>>;

/// A sink's readiness check, detached from the sink (which its task owns).
#[derive(Clone)]
pub(crate) struct Probe(Arc<dyn Fn() -> ProbeFuture + Send + Sync>);

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

impl Probe {
    /// A probe that runs `check`, failing with [`SinkError::Timeout`] past
    /// `limit`.
    pub(crate) fn new<F, Fut>(limit: Duration, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), SinkError>> + Send + 'static,
    {
        Self(Arc::new(move || {
            let check = check();
            Box::pin(async move {
                tokio::time::timeout(limit, check)
                    .await
                    .map_err(|_| SinkError::Timeout(limit))?
            })
        }))
    }

    pub(crate) async fn run(&self) -> Result<(), SinkError> {
        (self.0)().await
    }
}
