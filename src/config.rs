//! The hub's one configuration struct, read from flags and `IOTHUB_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

/// Everything `iothub serve` can be told. `Debug` and `Display` never show secrets.
#[derive(Args, Clone)]
pub struct Config {
    /// PostgreSQL to use. Unset: the hub creates and supervises its own cluster under `<data-dir>/postgres`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretString>,

    /// Folder for the hub's own files (the managed PostgreSQL cluster, the local CA under `tls/`).
    #[arg(long, env = "IOTHUB_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Plain HTTP address.
    #[arg(long, env = "IOTHUB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// HTTPS address. Without `--tls-cert`/`--tls-key` it presents a certificate of the hub's local CA
    /// (`<data-dir>/tls/ca.pem`, printed by `iothub ca`).
    #[arg(long, env = "IOTHUB_TLS_LISTEN")]
    pub tls_listen: Option<SocketAddr>,

    /// PEM certificate chain for the TLS listeners (unset: the local CA issues one).
    #[arg(long, env = "IOTHUB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for the TLS listeners.
    #[arg(long, env = "IOTHUB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The hub's host name: `HostName` of connection strings and the audience of SAS tokens.
    #[arg(long, env = "IOTHUB_HOSTNAME", default_value = "localhost")]
    pub hostname: String,

    /// Serve Prometheus metrics on this address instead of the API listener's `/metrics`.
    #[arg(long, env = "IOTHUB_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Database connections per hub process.
    #[arg(long, env = "IOTHUB_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,

    /// Requests handled at once per process; more wait (back-pressure) instead of piling up.
    #[arg(long, env = "IOTHUB_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,

    /// Upper bound on producing a response, in seconds; above the longest long poll (30 s). Streams are not cut.
    #[arg(long, env = "IOTHUB_REQUEST_TIMEOUT_SECS", default_value_t = 45)]
    pub request_timeout_secs: u64,

    /// How long, in milliseconds, authentication may reuse a device's or policy's keys read from the database.
    /// Changes reach every hub process at once through a notification; this bounds how stale a key can be when
    /// one is lost. 0 reads the database every time.
    #[arg(long, env = "IOTHUB_AUTH_CACHE_MS", default_value_t = 60_000)]
    pub auth_cache_ms: u64,

    #[command(flatten)]
    pub throttle: crate::throttle::ThrottleConfig,

    /// Cloud-to-device messaging.
    #[command(flatten)]
    pub c2d: crate::c2d::Settings,

    /// The feedback queue.
    #[command(flatten)]
    pub feedback: crate::feedback::Settings,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "IOTHUB_LOG_JSON", default_value_t = false)]
    pub log_json: bool,

    /// Device-to-cloud streams.
    #[command(flatten)]
    pub d2c: crate::d2c::Settings,

    /// The MQTT endpoint.
    #[command(flatten)]
    pub mqtt: crate::mqtt::Settings,
}

impl Config {
    /// A configuration with every default, for tests and embedding.
    pub fn with_database(url: &str) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        let mut config = Wrapper::parse_from(["iothub"]).config;
        config.database_url = Some(SecretString::from(url.to_string()));
        config
    }

    /// What clap's ranges cannot check (rules across settings), for configurations built in code too.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.c2d.validate()
    }

    pub fn auth_cache(&self) -> Duration {
        Duration::from_millis(self.auth_cache_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// A database URL with its password replaced, for logs and `--help`-style printing.
pub fn redact_url(url: &str) -> String {
    match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let authority = &rest[..authority_end];
            match authority.rfind('@') {
                Some(at) => {
                    let userinfo = &authority[..at];
                    let user = userinfo.split(':').next().unwrap_or("");
                    let redacted = if userinfo.contains(':') {
                        format!("{user}:***")
                    } else {
                        user.to_string()
                    };
                    format!(
                        "{}://{}@{}{}",
                        &url[..scheme_end],
                        redacted,
                        &authority[at + 1..],
                        &rest[authority_end..]
                    )
                }
                None => url.to_string(),
            }
        }
        None => "***".to_string(),
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "database_url",
                &self
                    .database_url
                    .as_ref()
                    .map(|u| redact_url(u.expose_secret())),
            )
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("tls_listen", &self.tls_listen)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key.as_ref().map(|_| "<file>"))
            .field("hostname", &self.hostname)
            .field("metrics_listen", &self.metrics_listen)
            .field("db_pool_size", &self.db_pool_size)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("auth_cache_ms", &self.auth_cache_ms)
            .field("throttle", &self.throttle)
            .field("c2d", &self.c2d)
            .field("feedback", &self.feedback)
            .field("d2c", &self.d2c)
            .field("mqtt", &self.mqtt)
            .finish()
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db?sslmode=disable"),
            "postgres://u:***@h:5432/db?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres:///db?host=/tmp"),
            "postgres:///db?host=/tmp"
        );
        let config = Config::with_database("postgres://u:hunter2@h/db");
        assert!(!format!("{config}").contains("hunter2"));
    }
}
