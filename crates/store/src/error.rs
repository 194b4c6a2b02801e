//! Storage errors, sorted by what a writer should do about them.

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("influxdb: {0}")]
    Influx(#[from] crate::influx::InfluxError),
    #[error("stored data is not readable: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether trying again later may succeed. Only errors about the data
    /// itself are final: SQLSTATE class 22 (data exception) and 23
    /// (integrity constraint violation), and corrupt stored data. Everything
    /// else (unreachable, timeouts, shutdown, deadlocks, but also a wrong
    /// password, a missing database or table, a revoked privilege, a
    /// read-only server after failover) is about the environment: the batch
    /// is kept and retried, never set aside, because setting it aside would
    /// lose events that are fine.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Postgres(error) => !pg_refuses_data(error),
            Self::Migrate(_) => true,
            Self::Corrupt(_) => false,
            Self::Influx(error) => error.is_transient(),
        }
    }
}

fn pg_refuses_data(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        // Values sqlx could not encode or decode.
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}
