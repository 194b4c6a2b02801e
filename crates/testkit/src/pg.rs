//! Per-test Postgres databases cloned from one migrated template.
//!
//! Migrations run once per backend, into [`TEMPLATE_DB`]; each test then
//! gets `CREATE DATABASE test_… TEMPLATE cellmon_template`, a file-level
//! copy that takes milliseconds, so tests share no mutable state.
//!
//! Database names in the SQL here are made by this module (a constant, or
//! `test_` and a UUID), never taken from input, hence `AssertSqlSafe`.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The migrated database every test database is cloned from.
pub const TEMPLATE_DB: &str = "cellmon_template";

/// The schema's migrations, applied to the template in order. Crates that
/// own a schema add their migrator here.
pub static MIGRATIONS: &[&Migrator] = &[&cellmon_store::MIGRATOR];

/// Creates and migrates the template unless it already exists. The template
/// then refuses connections, so nothing can block the clones.
pub async fn prepare_template(admin_url: &str, migrations: &[&Migrator]) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(TEMPLATE_DB)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_some() {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{TEMPLATE_DB}\"")))
        .execute(&mut admin)
        .await?;
    let template_url = with_database(admin_url, TEMPLATE_DB);
    let mut template = PgConnection::connect(&template_url).await?;
    for migrator in migrations {
        migrator.run(&mut template).await?;
    }
    template.close().await?;
    sqlx::query(AssertSqlSafe(format!(
        "ALTER DATABASE \"{TEMPLATE_DB}\" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    Ok(())
}

/// Clones the template into a new database with a unique name and returns
/// the name.
pub async fn create_test_database(admin_url: &str) -> anyhow::Result<String> {
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(admin_url).await?;
    let statement = format!("CREATE DATABASE \"{name}\" TEMPLATE \"{TEMPLATE_DB}\"");
    let mut attempt = 0;
    loop {
        match sqlx::query(AssertSqlSafe(statement.as_str()))
            .execute(&mut admin)
            .await
        {
            Ok(_) => break,
            // 55006 object_in_use: the template is briefly busy; try again.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("55006") && attempt < 20 =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    admin.close().await?;
    Ok(name)
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => format!("{url}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5/t1"
        );
    }
}
