//! The InfluxDB sink: each batch as one line-protocol `/write`
//! (`cellmon_store::influx`). A point's identity is measurement, tags and a
//! timestamp derived from the event, so writing a batch again rewrites the
//! same points.

use cellmon_domain::envelope::StreamEvent;
use cellmon_store::StoreError;
use cellmon_store::influx::{InfluxError, InfluxWriter, encode_batch};

use super::{Probe, Sink, SinkError, Written};

#[derive(Debug)]
pub(crate) struct InfluxSink {
    writer: InfluxWriter,
}

impl InfluxSink {
    pub(crate) fn new(writer: InfluxWriter) -> Self {
        Self { writer }
    }
}

impl Sink for InfluxSink {
    fn name(&self) -> &'static str {
        "influx"
    }

    async fn prepare(&mut self) -> Result<(), SinkError> {
        self.writer
            .create_database()
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    async fn write(&mut self, batch: &[StreamEvent]) -> Result<Written, SinkError> {
        match self.writer.write(encode_batch(batch)).await {
            Ok(()) => Ok(Written {
                stored: batch.len() as u64,
                duplicates: 0,
            }),
            Err(error) => {
                // The database went away (a new or wiped server): make it
                // again, so the retry succeeds.
                if matches!(error, InfluxError::Status { status: 404, .. })
                    && let Err(again) = self.writer.create_database().await
                {
                    tracing::warn!(
                        error = &again as &dyn std::error::Error,
                        "could not re-create the database"
                    );
                }
                Err(StoreError::from(error).into())
            }
        }
    }

    fn probe(&self) -> Probe {
        let writer = self.writer.clone();
        // The writer's own request timeout bounds the ping; the probe's is
        // a backstop.
        Probe::new(writer.timeout() * 2, move || {
            let writer = writer.clone();
            async move {
                writer.ping().await.map_err(StoreError::from)?;
                Ok(())
            }
        })
    }
}
