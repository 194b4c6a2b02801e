//! The whole system on one machine: the three backends, and in this
//! process the ingest server, the persister and the WebSocket gateway
//! (three `serve` calls, as production runs three processes), with one
//! class, its token and an instructor. `harness up` runs it until Ctrl-C;
//! `harness chaos` and the tests run faults against it.

use std::net::SocketAddr;
use std::path::PathBuf;

use cellmon_domain::lms::ClassId;
use cellmon_ingest::config::ClassToken;
use tokio::task::JoinHandle;

use cellmon_testkit::backend::BackendKind;
use cellmon_testkit::docker::Docker;
use cellmon_testkit::stack::Stack;

/// A running system.
#[derive(Debug)]
pub struct LocalSystem {
    pub stack: Stack,
    pub ingest_addr: SocketAddr,
    /// The persister's health and metrics.
    pub persister_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub class_id: ClassId,
    /// The class's ingest token.
    pub token: String,
    pub database_url: String,
    pub instructor: uuid::Uuid,
    /// A JWT for the instructor, valid for a week.
    pub instructor_token: String,
    pub jwt_secret: String,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
    spool_dir: PathBuf,
}

impl LocalSystem {
    /// Starts the backends, then the servers on these ports of 127.0.0.1
    /// (0: any free port).
    pub async fn start(
        docker: &Docker,
        ingest_port: u16,
        gateway_port: u16,
    ) -> anyhow::Result<Self> {
        let stack = Stack::start(docker).await?;
        Self::on(stack, ingest_port, gateway_port).await
    }

    /// Starts the servers in front of backends already running.
    pub async fn on(stack: Stack, ingest_port: u16, gateway_port: u16) -> anyhow::Result<Self> {
        // The ingest server, with one class and its token; in open mode
        // too, so the extension works without a token.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", ingest_port))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on 127.0.0.1:{ingest_port} ({e}); try --ingest-port")
            })?;
        let ingest_addr = listener.local_addr()?;
        let class_id = ClassId::random();
        let token = format!("dev-{}", uuid::Uuid::new_v4().simple());
        let spool_dir = std::env::temp_dir().join(format!(
            "cellmon-up-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        // The persister writes to a database of its own, which it migrates.
        let database_url = cellmon_testkit::pg::with_database(&stack.postgres.url(), "cellmon");
        create_database(&stack.postgres.url(), "cellmon").await?;
        let mut config = cellmon_ingest::Config {
            classes: vec![ClassToken {
                class_id,
                token: token.clone().into(),
            }],
            open_class: Some(class_id),
            ..cellmon_ingest::Config::default()
        };
        config.redis.url = stack.redis.url().into();
        config.spool.dir = spool_dir.clone();
        let mut persister_config = cellmon_persister::Config::default();
        persister_config.redis.url = stack.redis.url().into();
        persister_config.postgres.url = database_url.clone().into();
        persister_config.influx.url = stack.influx.url();
        persister_config.influx.database = "cellmon".into();
        // The schema first: the gateway reads it from its first request on.
        let pool = cellmon_store::pg::pool(&cellmon_store::pg::PgConfig {
            url: database_url.clone(),
            max_connections: 2,
            timeout: std::time::Duration::from_secs(10),
        })?;
        cellmon_store::MIGRATOR.run(&pool).await?;
        let instructor = uuid::Uuid::new_v4();
        cellmon_store::classes::register(&pool, class_id, "Local class", Some(&token)).await?;
        cellmon_store::classes::add_instructor(
            &pool,
            instructor,
            "instructor@localhost",
            "Instructor",
        )
        .await?;
        cellmon_store::classes::assign(&pool, class_id, instructor).await?;
        pool.close().await;

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let signal = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let ingest = tokio::spawn(cellmon_ingest::serve(config, listener, signal()));
        let persister_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let persister_addr = persister_listener.local_addr()?;
        let persister = tokio::spawn(cellmon_persister::serve(
            persister_config,
            persister_listener,
            signal(),
        ));

        let gateway_listener = tokio::net::TcpListener::bind(("127.0.0.1", gateway_port))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on 127.0.0.1:{gateway_port} ({e}); try --gateway-port"
                )
            })?;
        let gateway_addr = gateway_listener.local_addr()?;
        let jwt_secret = uuid::Uuid::new_v4().simple().to_string();
        let mut gateway_config = cellmon_gateway::Config {
            jwt_secret: jwt_secret.clone().into(),
            allowed_origins: vec![format!("http://{gateway_addr}"), "http://localhost".into()],
            ..cellmon_gateway::Config::default()
        };
        gateway_config.redis.url = stack.redis.url().into();
        gateway_config.postgres.url = database_url.clone().into();
        let instructor_token =
            cellmon_gateway::auth::Verifier::new(&jwt_secret.clone().into(), 0, 30)
                .issue_token(instructor, 7 * 24 * 3600)?;
        let gateway = tokio::spawn(cellmon_gateway::serve(
            gateway_config,
            gateway_listener,
            signal(),
        ));
        Ok(Self {
            stack,
            ingest_addr,
            persister_addr,
            gateway_addr,
            class_id,
            token,
            database_url,
            instructor,
            instructor_token,
            jwt_secret,
            stop,
            tasks: vec![
                ("ingest server", ingest),
                ("persister", persister),
                ("gateway", gateway),
            ],
            spool_dir,
        })
    }

    /// The events URL with the class's token.
    pub fn events_url(&self) -> String {
        format!(
            "http://{}/api/v1/events?token={}",
            self.ingest_addr, self.token
        )
    }

    /// `KEY=VALUE` lines for everything a client needs.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for kind in BackendKind::ALL {
            env.push((kind.url_var().to_owned(), self.stack.backend(kind).url()));
        }
        let mut set = |key: &str, value: String| env.push((key.to_owned(), value));
        set("CELLMON_DATABASE_URL", self.database_url.clone());
        set("CELLMON_INFLUX_DATABASE", "cellmon".into());
        set("CELLMON_INGEST_URL", format!("http://{}", self.ingest_addr));
        set(
            "CELLMON_PERSISTER_URL",
            format!("http://{}", self.persister_addr),
        );
        set("CELLMON_CLASS_ID", self.class_id.to_string());
        set("CELLMON_INGEST_TOKEN", self.token.clone());
        set(
            "CELLMON_GATEWAY_URL",
            format!("ws://{}/ws", self.gateway_addr),
        );
        set(
            "CELLMON_GATEWAY_HTTP_URL",
            format!("http://{}", self.gateway_addr),
        );
        set("CELLMON_INSTRUCTOR_ID", self.instructor.to_string());
        set("CELLMON_INSTRUCTOR_TOKEN", self.instructor_token.clone());
        set("CELLMON_JWT_SECRET", self.jwt_secret.clone());
        set("CELLMON_SERVER_PID", std::process::id().to_string());
        env
    }

    /// [`Self::env`] as the text of an env file.
    pub fn env_text(&self) -> String {
        self.env()
            .into_iter()
            .map(|(key, value)| format!("{key}={value}\n"))
            .collect()
    }

    /// Stops the servers (draining what they hold), then removes the
    /// backends.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        for (name, task) in self.tasks {
            let result = match task.await {
                Ok(result) => result,
                Err(error) => Err(anyhow::anyhow!("{name} task: {error}")),
            };
            if let Err(error) = result {
                tracing::error!("{name}: {error:#}");
                first_error.get_or_insert(error);
            }
        }
        self.stack.shutdown().await?;
        let _ = std::fs::remove_dir_all(&self.spool_dir);
        first_error.map_or(Ok(()), Err)
    }
}

/// `CREATE DATABASE name` unless it exists.
async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        // `name` is a constant of this program, never input.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
    }
    admin.close().await?;
    Ok(())
}
