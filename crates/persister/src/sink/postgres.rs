//! The Postgres sink: each batch in one transaction
//! (`cellmon_store::pg::write_batch`: idempotent, `ON CONFLICT DO NOTHING`),
//! then, as a step of its own after the commit, the derived status of the
//! students the batch touched ([`crate::status`]).
//!
//! A failure of the status step that retrying can fix (Redis away, a
//! Postgres outage) fails the write, so the batch is retried and stays
//! unacknowledged: the commit writes nothing the second time and only the
//! status step is redone. Stored data the status rules cannot read is no
//! reason to set committed events aside: it is counted
//! (`cellmon_persist_status_failures_total`), logged, and the batch is
//! acknowledged; the student's next event recomputes the status.

use std::time::Duration;

use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::lms::StudentId;
use cellmon_store::StoreError;
use cellmon_store::pg::{self, WriteOutcome};
use sqlx::PgPool;

use super::{Probe, Sink, SinkError, Written};
use crate::metrics::Metrics;
use crate::status::StatusPublisher;

/// A batch is about ten statements, each under `statement_timeout`: this
/// many statement timeouts bound one batch, or its status step, even on a
/// connection that stopped answering altogether.
const STATEMENTS_PER_BATCH: u32 = 10;

#[derive(Debug)]
pub(crate) struct PostgresSink {
    pool: PgPool,
    migrate: bool,
    status: StatusPublisher,
    metrics: Metrics,
    /// The statement timeout.
    timeout: Duration,
}

impl PostgresSink {
    pub(crate) fn new(
        status: StatusPublisher,
        migrate: bool,
        metrics: Metrics,
        timeout: Duration,
    ) -> Self {
        Self {
            pool: status.pool().clone(),
            migrate,
            status,
            metrics,
            timeout,
        }
    }

    fn batch_limit(&self) -> Duration {
        self.timeout * STATEMENTS_PER_BATCH
    }

    /// Step 1: the batch in one transaction.
    async fn commit(&self, batch: &[StreamEvent]) -> Result<WriteOutcome, SinkError> {
        let limit = self.batch_limit();
        let outcome = tokio::time::timeout(limit, pg::write_batch(&self.pool, batch))
            .await
            .map_err(|_| SinkError::Timeout(limit))??;
        Ok(outcome)
    }

    /// Step 2, after the commit: the touched students' status, published
    /// and stored.
    async fn publish_status(&mut self, students: &[StudentId]) -> Result<(), SinkError> {
        let limit = self.batch_limit();
        match tokio::time::timeout(limit, self.status.publish(students)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) if error.is_transient() => Err(SinkError::Status(error)),
            Ok(Err(error)) => {
                self.metrics.status_failures.inc();
                tracing::error!(
                    error = &error as &dyn std::error::Error,
                    "derived status not updated for a committed batch"
                );
                Ok(())
            }
            Err(_) => Err(SinkError::Timeout(limit)),
        }
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        "pg"
    }

    async fn prepare(&mut self) -> Result<(), SinkError> {
        if self.migrate {
            pg::migrate(&self.pool).await?;
        }
        Ok(())
    }

    async fn write(&mut self, batch: &[StreamEvent]) -> Result<Written, SinkError> {
        let outcome = self.commit(batch).await?;
        self.publish_status(&outcome.students).await?;
        Ok(Written {
            stored: outcome.inserted,
            duplicates: outcome.duplicates,
        })
    }

    fn probe(&self) -> Probe {
        let pool = self.pool.clone();
        Probe::new(self.timeout, move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map_err(StoreError::from)?;
                Ok(())
            }
        })
    }
}
