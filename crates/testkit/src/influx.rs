//! A minimal InfluxDB 1.x HTTP API client (`/ping`, `/write`, `/query`):
//! enough for the harness to prepare databases and check what was written.

use std::time::Duration;

use anyhow::Context as _;
use reqwest::Url;

/// Talks to one InfluxDB server.
#[derive(Debug, Clone)]
pub struct InfluxClient {
    http: reqwest::Client,
    base: Url,
}

impl InfluxClient {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()?;
        Ok(Self {
            http,
            base: Url::parse(base).with_context(|| format!("bad InfluxDB URL {base}"))?,
        })
    }

    fn url(&self, path: &str) -> anyhow::Result<Url> {
        Ok(self.base.join(path)?)
    }

    /// `GET /ping`; InfluxDB answers 204 when it is up.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let response = self.http.get(self.url("/ping")?).send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "ping: {}",
            response.status()
        );
        Ok(())
    }

    /// Runs an InfluxQL statement and returns the JSON answer. Statement
    /// errors (which InfluxDB reports with status 200) become errors.
    pub async fn query(&self, db: Option<&str>, q: &str) -> anyhow::Result<serde_json::Value> {
        let mut params = vec![("q", q)];
        if let Some(db) = db {
            params.push(("db", db));
        }
        let response = self
            .http
            .post(self.url("/query")?)
            .query(&params)
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "query {q:?}: {status}: {body}");
        if let Some(error) = body["results"][0]["error"]
            .as_str()
            .or(body["error"].as_str())
        {
            anyhow::bail!("query {q:?}: {error}");
        }
        Ok(body)
    }

    pub async fn create_database(&self, db: &str) -> anyhow::Result<()> {
        self.query(None, &format!("CREATE DATABASE \"{db}\""))
            .await?;
        Ok(())
    }

    /// Writes line protocol (`precision=ns`).
    pub async fn write(&self, db: &str, lines: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .post(self.url("/write")?)
            .query(&[("db", db), ("precision", "ns")])
            .body(lines.to_owned())
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("write: {status}: {body}");
        }
        Ok(())
    }

    /// `SELECT COUNT(field) FROM measurement`: 0 when there are no points.
    pub async fn count(&self, db: &str, measurement: &str, field: &str) -> anyhow::Result<u64> {
        let body = self
            .query(
                Some(db),
                &format!("SELECT COUNT(\"{field}\") FROM \"{measurement}\""),
            )
            .await?;
        let value = &body["results"][0]["series"][0]["values"][0][1];
        Ok(value.as_u64().unwrap_or(0))
    }
}
