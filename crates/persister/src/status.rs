//! The derived-status step: after events are committed (and on the
//! periodic sweep), recompute the status of the students concerned, publish
//! what changed to each class's live channel, then store it.
//!
//! The students' rows stay locked from the recompute until the result is
//! stored (`cellmon_store::status::Recomputed`), so concurrent persisters
//! publish a student's updates in commit order.

use std::collections::BTreeMap;

use cellmon_bus::StreamKeys;
use cellmon_bus::live::{self, LiveError};
use cellmon_domain::live::{LiveBody, Unnumbered, alerts};
use cellmon_domain::lms::{ClassId, StudentId};
use cellmon_store::{StoreError, status};
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::metrics::Metrics;

/// Why the status step failed. Nothing was stored; the events it was for
/// stay committed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StatusError {
    #[error("recomputing or storing the status failed")]
    Store(#[from] StoreError),
    #[error("publishing live updates failed")]
    Live(#[from] LiveError),
}

impl StatusError {
    /// Whether doing the step again later may succeed: Redis failures and
    /// Postgres outages, not stored data the rules cannot read.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Store(error) => error.is_transient(),
            Self::Live(_) => true,
        }
    }
}

/// Recomputes, publishes and stores students' status. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct StatusPublisher {
    pool: PgPool,
    redis: ConnectionManager,
    keys: StreamKeys,
    metrics: Metrics,
}

impl StatusPublisher {
    pub(crate) fn new(
        pool: PgPool,
        redis: ConnectionManager,
        keys: StreamKeys,
        metrics: Metrics,
    ) -> Self {
        Self {
            pool,
            redis,
            keys,
            metrics,
        }
    }

    /// The step for `students`: what changed goes out per class (alerts,
    /// then the update), then the new statuses are stored.
    pub(crate) async fn publish(&mut self, students: &[StudentId]) -> Result<(), StatusError> {
        if students.is_empty() {
            return Ok(());
        }
        let recomputed =
            status::recompute(&self.pool, students, time::OffsetDateTime::now_utc()).await?;
        let mut by_class: BTreeMap<ClassId, Vec<Unnumbered>> = BTreeMap::new();
        for change in &recomputed.changes {
            let messages = by_class.entry(change.class_id).or_default();
            for alert in alerts(change.before.as_ref(), &change.after) {
                messages.push(Unnumbered {
                    class_id: change.class_id,
                    body: LiveBody::Alert {
                        student: change.student.clone(),
                        alert,
                    },
                });
            }
            if change.before.as_ref() != Some(&change.after) {
                messages.push(Unnumbered {
                    class_id: change.class_id,
                    body: LiveBody::StudentUpdate {
                        student: change.student.clone(),
                        status: change.after.clone(),
                    },
                });
            }
        }
        for (class, messages) in &by_class {
            if messages.is_empty() {
                continue;
            }
            live::publish(&mut self.redis, &self.keys, *class, messages).await?;
            for message in messages {
                let kind = match message.body {
                    LiveBody::StudentUpdate { .. } => "student_update",
                    LiveBody::Alert { .. } => "alert",
                };
                self.metrics.live_messages.with_label_values(&[kind]).inc();
            }
        }
        recomputed.commit().await?;
        Ok(())
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }
}
