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
    /// Whether trying again later may succeed: the database was unreachable,
    /// slow, restarting, or chose this transaction as a deadlock victim.
    /// Anything else (bad data, a constraint the batch breaks) fails the
    /// same way every time, so retrying it would loop forever.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Postgres(error) => pg_transient(error),
            Self::Migrate(_) | Self::Corrupt(_) => false,
            Self::Influx(error) => error.is_transient(),
        }
    }
}

fn pg_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // SQLSTATE classes: 08 connection exception, 40 transaction
            // rollback (serialization failure, deadlock), 53 insufficient
            // resources, 57 operator intervention (shutdown, statement
            // timeout), 58 system error.
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}
