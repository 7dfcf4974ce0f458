//! The test harness: a fresh database per test on a real PostgreSQL, and a hub launched on a random port.
//!
//! PostgreSQL comes from `DATABASE_URL` when it is set (the role needs CREATEDB); otherwise the harness runs a
//! private cluster under the target folder, exactly as `iothub serve` does with no configuration, so `cargo test`
//! passes on a machine that has nothing but the `postgresql` package.
#![allow(dead_code)]

pub mod mqtt;
pub mod pki;

use std::str::FromStr;
use std::time::Duration;

use iothub::auth::sas;
use iothub::cli::client::API_VERSION;
use iothub::postgres::ManagedCluster;
use iothub::{Config, Listeners};
use reqwest::Method;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::sync::OnceCell;

pub const HOST: &str = "testhub.example.net";

/// Connection options for the server that holds the test databases (its maintenance database).
async fn server() -> &'static PgConnectOptions {
    static SERVER: OnceCell<PgConnectOptions> = OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return PgConnectOptions::from_str(&url).expect("DATABASE_URL");
            }
            let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
            let root = target.join("test-postgres");
            std::fs::create_dir_all(&root).unwrap();
            // Test binaries may run at once (nextest): one of them creates and starts the cluster, the others adopt it.
            let lock = std::fs::File::create(target.join("test-postgres.lock")).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: flock(2) on a file descriptor we own.
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
            let cluster = match ManagedCluster::start(&root).await {
                Ok(cluster) => cluster,
                // As root, PostgreSQL runs as another user, who may not be able to enter a checkout under a
                // private home folder: then the cluster lives in the system's temporary folder.
                Err(error) => {
                    let fallback = std::env::temp_dir().join("iothub-test-postgres");
                    eprintln!("test cluster: {error:#}; using {}", fallback.display());
                    ManagedCluster::start(&fallback)
                        .await
                        .expect("start a private PostgreSQL for the tests")
                }
            };
            // Left running for the next test binary; `.ci/run` stops it through this file.
            std::fs::write(
                target.join("test-postgres.datadir"),
                cluster.data_dir().display().to_string(),
            )
            .unwrap();
            let options = cluster.options("postgres");
            drop(lock);
            options
        })
        .await
}

/// A new, empty database; dropped when the returned guard drops.
pub struct TestDb {
    pub name: String,
    pub options: PgConnectOptions,
    server: PgConnectOptions,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let server = server().await.clone();
        let name = format!("iothub_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = server.connect().await.expect("connect to the test server");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create a test database");
        conn.close().await.ok();
        TestDb {
            options: server.clone().database(&name),
            name,
            server,
        }
    }

    /// A `DATABASE_URL` for this database, for running the `iothub` binary against it.
    pub fn url(&self) -> String {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let (base, query) = url.split_once('?').unwrap_or((&url, ""));
            let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{query}")
            };
            return format!("{base}/{}{query}", self.name);
        }
        let socket = self
            .options
            .get_socket()
            .expect("the private cluster listens on a socket");
        format!(
            "postgres://{}@localhost/{}?host={}&port={}",
            self.options.get_username(),
            self.name,
            socket.display(),
            self.options.get_port()
        )
    }

    pub async fn pool(&self) -> PgPool {
        iothub::postgres::connect(self.options.clone(), 8)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = self.server.clone();
        {
            // Drop from a thread of its own: this may run inside or outside a runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    if let Ok(mut conn) = server.connect().await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A hub serving on a random local port, with its own database.
pub struct TestHub {
    pub base: String,
    pub db: PgPool,
    pub config: Config,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<iothub::RunningHub>,
    _database: TestDb,
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestHub {
        let database = TestDb::create().await;
        let mut config = Config::with_database("postgres://unused");
        config.hostname = HOST.to_string();
        config.listen = "127.0.0.1:0".parse().unwrap();
        adjust(&mut config);
        let pool = database.pool().await;
        let listeners = Listeners {
            http: tokio::net::TcpListener::bind(config.listen).await.unwrap(),
            tls: match config.tls_listen {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.unwrap()),
                None => None,
            },
            metrics: match config.metrics_listen {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.unwrap()),
                None => None,
            },
            // MQTT on random ports: plain always, over TLS when the test configured a certificate.
            mqtts: match config.tls_cert {
                Some(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
                None => None,
            },
            mqtt: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = iothub::launch(config.clone(), pool.clone(), listeners, async move {
            let _ = stopped.await;
        })
        .await
        .expect("launch the hub");
        TestHub {
            base: format!("http://{}", running.http_addr),
            db: pool,
            config,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            stop: Some(stop),
            running: Some(running),
            _database: database,
        }
    }

    /// The plain MQTT listener's address.
    pub fn mqtt_addr(&self) -> std::net::SocketAddr {
        self.running().mqtt_addr.expect("an MQTT listener")
    }

    /// The MQTT over TLS listener's address (configured with a certificate only).
    pub fn mqtts_addr(&self) -> std::net::SocketAddr {
        self.running()
            .mqtts_addr
            .expect("an MQTT over TLS listener")
    }

    pub fn database_url(&self) -> String {
        self._database.url()
    }

    pub fn running(&self) -> &iothub::RunningHub {
        self.running.as_ref().unwrap()
    }

    /// Stops the hub gracefully and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(running) = self.running.take() {
            running.wait().await.unwrap();
        }
    }

    pub async fn policy_key(&self, name: &str) -> String {
        iothub::auth::policies::get(&self.db, name)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("policy {name}"))
            .primary_key
    }

    /// A token for policy `name`, scoped to the whole hub, valid for an hour.
    pub async fn policy_token(&self, name: &str) -> String {
        let key = self.policy_key(name).await;
        sas::sign(HOST, &key, Some(name), now() + 3600).unwrap()
    }

    pub async fn owner(&self) -> String {
        self.policy_token("iothubowner").await
    }

    /// A request to `path` (api-version added) with `token`.
    pub fn request(&self, method: Method, path: &str, token: &str) -> reqwest::RequestBuilder {
        let separator = if path.contains('?') { '&' } else { '?' };
        self.http
            .request(
                method,
                format!("{}{path}{separator}api-version={API_VERSION}", self.base),
            )
            .header("Authorization", token)
    }

    /// The first page (up to 100) of every partition's events, from the start, in partition order.
    pub async fn events(&self) -> Vec<Value> {
        let owner = self.owner().await;
        let info: Value = self
            .request(Method::GET, "/messages/events", &owner)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut events = Vec::new();
        for partition in info["partitions"].as_array().unwrap() {
            let p = partition["partitionId"].as_str().unwrap();
            let page: Value = self
                .request(
                    Method::GET,
                    &format!("/messages/events/partitions/{p}?from=start"),
                    &owner,
                )
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            events.extend(page["events"].as_array().unwrap().iter().cloned());
        }
        events
    }

    /// The database's clock: the clock every time-based rule of the hub reads.
    pub async fn db_now(&self) -> chrono::DateTime<chrono::Utc> {
        db_now(&self.db).await
    }

    /// Waits until exactly `n` long polls of this hub wait on `on`: such a poll has been received and registered
    /// for wake-ups (it registers before it looks), so whatever commits from now on reaches it. A test produces
    /// the event after this, instead of after a sleep that cannot tell "waiting" from "not sent yet".
    pub async fn wait_for_polls(&self, on: Wake<'_>, n: usize) {
        wait_for_polls(self.running(), on, n).await
    }

    /// Long polls of this hub waiting on `on` right now.
    pub fn polls_waiting(&self, on: Wake<'_>) -> usize {
        on.count(self.running())
    }

    /// Creates a device with generated keys; returns its JSON.
    pub async fn create_device(&self, id: &str) -> Value {
        let token = self.owner().await;
        let response = self
            .request(Method::PUT, &device_path(id), &token)
            .json(&serde_json::json!({"deviceId": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "create {id}");
        response.json().await.unwrap()
    }

    /// Disables the device through the registry (as an operator would).
    pub async fn disable_device(&self, id: &str) {
        let owner = self.owner().await;
        let response = self
            .request(Method::PUT, &device_path(id), &owner)
            .header("If-Match", "*")
            .json(&serde_json::json!({"deviceId": id, "status": "disabled"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "disable {id}");
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How long a test waits for something that should happen at once, or at a time it has set, before it fails.
/// Generous on purpose: it is a liveness deadline for a loaded machine, not a speed claim.
pub const LIVENESS: Duration = Duration::from_secs(60);

/// The wait tests ask of a long poll, as `wait-ms`.
pub const LONG_POLL_MS: u64 = 30_000;

/// Awaits a long poll's answer for half its wait at most. A poll that is woken answers at once; one whose wake-up
/// is lost still answers, with the same message, when its wait runs out (it looks a last time). Only this deadline
/// tells the two apart; it is a liveness deadline, not a speed claim.
pub async fn woken<T>(answer: impl std::future::Future<Output = T>) -> T {
    let half = Duration::from_millis(LONG_POLL_MS / 2);
    tokio::time::timeout(half, answer)
        .await
        .unwrap_or_else(|_| panic!("a long poll was not woken within {half:?}"))
}

/// Polls `check` every few milliseconds until it holds; fails naming `what` after [`LIVENESS`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {LIVENESS:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a long poll waits for.
#[derive(Clone, Copy, Debug)]
pub enum Wake<'a> {
    /// A device's C2D receive (`wait-ms`).
    C2d(&'a str),
    /// The service's feedback receive.
    Feedback,
    /// A read of one D2C partition.
    D2c(u32),
}

impl Wake<'_> {
    fn count(self, hub: &iothub::RunningHub) -> usize {
        use iothub::notify::channel;
        match self {
            Wake::C2d(device) => hub.waiting(channel::C2D, device),
            Wake::Feedback => hub.waiting(channel::FEEDBACK, ""),
            Wake::D2c(partition) => hub.waiting(channel::D2C, &partition.to_string()),
        }
    }
}

/// Waits until exactly `n` long polls of `hub` (in this test process) wait on `on`.
pub async fn wait_for_polls(hub: &iothub::RunningHub, on: Wake<'_>, n: usize) {
    wait_until(&format!("{n} long poll(s) waiting on {on:?}"), || {
        std::future::ready(on.count(hub) == n)
    })
    .await
}

/// `now()` of the database.
pub async fn db_now(db: &PgPool) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(db)
        .await
        .unwrap()
}

/// Waits until the database's clock is past `at`.
pub async fn wait_for_db_time(db: &PgPool, at: chrono::DateTime<chrono::Utc>) {
    wait_until(
        &format!("the database's clock to pass {at}"),
        move || async move { db_now(db).await > at },
    )
    .await
}

/// Parses a time the API reports (RFC 3339).
pub fn api_time(value: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(
        value.as_str().unwrap_or_else(|| panic!("a time: {value}")),
    )
    .unwrap_or_else(|e| panic!("a time: {value}: {e}"))
    .with_timezone(&chrono::Utc)
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn device_path(id: &str) -> String {
    format!("/devices/{}", sas::encode_component(id))
}

/// A device token signed with `key`, for `{HOST}/devices/{id}`.
pub fn device_token(id: &str, key: &str) -> String {
    sas::sign(&format!("{HOST}/devices/{id}"), key, None, now() + 3600).unwrap()
}

pub fn primary_key(device: &Value) -> String {
    device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string()
}

pub fn secondary_key(device: &Value) -> String {
    device["authentication"]["symmetricKey"]["secondaryKey"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Asserts IoT Hub's error shape: status, `iothub-errorcode` header, `{Message, ExceptionMessage}`.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status, "status of {}", response.url());
    assert_eq!(
        response
            .headers()
            .get("iothub-errorcode")
            .map(|v| v.to_str().unwrap()),
        Some(code),
        "iothub-errorcode"
    );
    let body: Value = response.json().await.expect("a JSON error body");
    let message = body["Message"].as_str().expect("Message");
    assert!(
        message.starts_with(&format!("ErrorCode:{code};")),
        "Message: {message}"
    );
    assert!(body["ExceptionMessage"].is_string());
}

/// A hub in its own process; killed with SIGKILL when dropped.
pub struct HubProcess {
    child: tokio::process::Child,
    pub base: String,
}

impl HubProcess {
    /// The real `iothub serve` on `url`, with short C2D locks and sweeps (tests wait for them).
    pub async fn start(url: &str, data_dir: &std::path::Path) -> HubProcess {
        Self::start_with(url, data_dir, &[], None).await
    }

    /// As [`HubProcess::start`], with more (or overriding) environment variables, and standard error written to
    /// `stderr` when given (inherited otherwise).
    pub async fn start_with(
        url: &str,
        data_dir: &std::path::Path,
        env: &[(&str, &str)],
        stderr: Option<&std::path::Path>,
    ) -> HubProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_iothub"));
        command
            .arg("serve")
            .env("DATABASE_URL", url)
            .env("IOTHUB_LISTEN", format!("127.0.0.1:{port}"))
            .env("IOTHUB_HOSTNAME", HOST)
            .env("IOTHUB_DATA_DIR", data_dir)
            .env("IOTHUB_C2D_LOCK_SECS", "5")
            .env("IOTHUB_C2D_SWEEP_INTERVAL_MS", "200")
            // Never IoT Hub's 8883: tests run side by side.
            .env("IOTHUB_MQTTS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(path) = stderr {
            command.stderr(std::fs::File::create(path).expect("a file for the hub's log"));
        }
        let mut child = command.spawn().expect("start the hub binary");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let start = std::time::Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{base}/health/ready")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the hub exited while starting: {status}");
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "the hub did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        HubProcess { child, base }
    }

    /// The address the hub listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.base.trim_start_matches("http://").parse().unwrap()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("the hub is running") as libc::pid_t;
        // SAFETY: kill(2) on the process this harness started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    /// Waits for the process to exit by itself, at most `limit`; its exit status.
    pub async fn exit_status(mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("the hub exits")
            .unwrap()
    }
}
