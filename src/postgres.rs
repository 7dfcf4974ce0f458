//! Connecting to PostgreSQL, migrating it, and the managed local cluster of the zero-configuration start.
//!
//! With no `DATABASE_URL` the hub runs its own cluster from the PostgreSQL server binaries on the machine: created
//! under `<data-dir>/postgres` on the first start, listening on a Unix socket in its own folder only (so it never
//! collides with a PostgreSQL that already serves port 5432), and stopped when the hub stops. PostgreSQL refuses
//! to run as root, so when the hub runs as root the cluster belongs to the `postgres` (or `nobody`) user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool};

/// The schema, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A connection that sat idle at least this long is tested (one round trip) before it is handed out, so that one
/// left over from before a database restart is replaced instead of failing a request. A connection used a moment
/// ago, and tested when it was released, is handed out as it is: testing it as well would add a round trip to
/// every query of a busy hub.
const TEST_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// What every pool of the hub shares: at most `max_connections`, the acquire bounded, the connection test above.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= TEST_WHEN_IDLE_FOR {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
}

/// A pool on `options`, failing fast with a clear message when the server cannot be reached.
pub async fn connect(options: PgConnectOptions, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = options.log_statements(tracing::log::LevelFilter::Trace);
    pool_options(max_connections)
        .min_connections(1)
        .connect_with(options)
        .await
        .context("cannot connect to PostgreSQL")
}

/// A pool of `size` connections of their own, on `db`'s database, for writer tasks: their transactions never queue
/// behind the requests' queries in the shared pool.
pub async fn writer_pool(db: &PgPool, size: u32) -> Result<PgPool, sqlx::Error> {
    pool_options(size)
        .min_connections(0)
        .connect_with(db.connect_options().as_ref().clone())
        .await
}

/// A connection a writer task owns, outside any pool. A pooled connection costs a round trip every time it is given
/// back (the driver tests it then), and a writer runs one transaction after another on one connection, so it needs
/// no pool. As in the pools, the connection is tested before use only when it sat idle for a second (a restarted
/// database is noticed before a transaction fails on it); after a failure it is rolled back or replaced.
pub struct OwnConnection {
    options: PgConnectOptions,
    open: Option<(sqlx::PgConnection, Instant)>,
}

impl OwnConnection {
    /// Opens nothing yet: the first [`OwnConnection::get`] connects to `db`'s database.
    pub fn new(db: &PgPool) -> OwnConnection {
        OwnConnection {
            options: db.connect_options().as_ref().clone(),
            open: None,
        }
    }

    /// The connection, opened again when there is none or it no longer answers.
    pub async fn get(&mut self) -> Result<&mut sqlx::PgConnection, sqlx::Error> {
        let usable = match &mut self.open {
            Some((connection, used)) => {
                used.elapsed() < TEST_WHEN_IDLE_FOR || connection.ping().await.is_ok()
            }
            None => false,
        };
        if !usable {
            self.open = Some((self.options.connect().await?, Instant::now()));
        }
        let (connection, used) = self.open.as_mut().expect("opened above");
        *used = Instant::now();
        Ok(connection)
    }

    /// After a statement failed inside a transaction: rolls it back, or drops the connection (the server then rolls
    /// back) when that fails too.
    async fn rollback(&mut self) {
        if let Some((connection, _)) = &mut self.open {
            if !rollback(connection).await {
                self.open = None;
            }
        }
    }

    /// After a failure that leaves the connection's state unknown (at a commit): the next use opens a new one.
    fn discard(&mut self) {
        self.open = None;
    }

    /// Leaves the connection ready for the next transaction after `failure`: rolled back, or replaced.
    pub async fn recover(&mut self, failure: &GroupFailure) {
        match failure {
            GroupFailure::NotCommitted(_) => self.rollback().await,
            GroupFailure::Commit(_) => self.discard(),
        }
    }
}

/// Why a writer's transaction, which holds a group of requests, failed as a whole.
#[derive(Debug)]
pub enum GroupFailure {
    /// Before the commit: nothing of the group is stored (the caller rolls the transaction back), so each request
    /// may be tried again alone.
    NotCommitted(sqlx::Error),
    /// At the commit: whether it took effect is unknown.
    Commit(sqlx::Error),
}

/// Rolls back the transaction a raw `BEGIN` opened on `connection`, after a failure in it (a warning, no error,
/// when none is open); false when that fails too, and the connection is broken. A pooled connection given back
/// broken fails the pool's test and is closed, so it never reaches another caller inside a failed transaction.
pub async fn rollback(connection: &mut sqlx::PgConnection) -> bool {
    connection.execute("ROLLBACK").await.is_ok()
}

/// `text` as an SQL string literal, for the few statements sent as text with no parameters (a simple query runs
/// several statements in one round trip, but binds nothing): quotes doubled, and backslashes doubled in an `E''`
/// literal, which reads the same whatever `standard_conforming_strings` says (PostgreSQL's own `quote_literal`).
pub fn literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

pub fn parse_url(url: &str) -> anyhow::Result<PgConnectOptions> {
    PgConnectOptions::from_str(url)
        .map_err(|e| anyhow!("DATABASE_URL is not a PostgreSQL URL: {e}"))
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("database migration failed")
}

/// SQLSTATE of a unique violation, for stores that turn one into a domain error.
pub const UNIQUE_VIOLATION: &str = "23505";
/// SQLSTATE of a foreign-key violation.
pub const FOREIGN_KEY_VIOLATION: &str = "23503";

/// The SQLSTATE of a database error (stores map constraint violations by SQLSTATE, not by constraint name).
pub fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether an error means "the database is going away, overloaded or out of reach" (worth a retry) rather than
/// "this statement is wrong": lost connections, an exhausted pool, and the SQLSTATE classes 57P, 08 and 53300.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some(c) if c.starts_with("57P") || c.starts_with("08") || c == "53300"
        ),
        _ => false,
    }
}

/// An enum stored as text, its column holding a CHECK that lists the same values (SCALE-OUT: no database enum
/// types to keep in step across nodes): `as_str`, a case-insensitive `parse`, `Display`, and sqlx encoding and
/// decoding as text.
#[macro_export]
macro_rules! text_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value as stored and written on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The value named `text`, in any case.
            pub fn parse(text: &str) -> Option<$name> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(text))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'q, sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<'r, sqlx::Postgres>>::decode(value)?;
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == text)
                    .ok_or_else(|| format!("{} has no value {text:?}", stringify!($name)).into())
            }
        }
    };
}

/// A PostgreSQL cluster this process started (or found running from an earlier run) and will stop.
pub struct ManagedCluster {
    data_dir: PathBuf,
    socket_dir: PathBuf,
    child: Option<std::process::Child>,
}

const DATABASE: &str = "iothub";
const SUPERUSER: &str = "postgres";
const PORT: u16 = 5432;

impl ManagedCluster {
    /// Creates the cluster under `root` on first use, starts it (or adopts one already running there) and makes
    /// sure the hub's database exists.
    pub async fn start(root: &Path) -> anyhow::Result<ManagedCluster> {
        let root = absolute(root)?;
        let data_dir = root.join("pgdata");
        let socket_dir = root.join("run");
        let bin = find_bindir()?;
        let owner = cluster_owner()?;
        std::fs::create_dir_all(&socket_dir)
            .with_context(|| format!("cannot create {}", socket_dir.display()))?;
        if let Some((uid, gid)) = owner {
            chown_tree(&root, uid, gid)?;
            check_reachable(&root, uid)?;
        }

        if !data_dir.join("PG_VERSION").exists() {
            tracing::info!(dir = %data_dir.display(), "creating a local PostgreSQL cluster");
            let mut initdb = Command::new(bin.join("initdb"));
            initdb
                .arg("-D")
                .arg(&data_dir)
                .args([
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            as_owner(&mut initdb, owner);
            let out = initdb.output().context("cannot run initdb")?;
            if !out.status.success() {
                bail!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }

        let mut cluster = ManagedCluster {
            data_dir,
            socket_dir,
            child: None,
        };
        if cluster.accepts_connections().await {
            tracing::info!("adopting the local PostgreSQL cluster that is already running");
        } else {
            cluster.spawn(&bin, owner)?;
            cluster.wait_until_ready().await?;
        }
        cluster.ensure_database().await?;
        Ok(cluster)
    }

    fn spawn(&mut self, bin: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("postgres.log"))
            .context("cannot open the PostgreSQL log")?;
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=", "-p", &PORT.to_string()])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        as_owner(&mut postgres, owner);
        // Its own process group, so a Ctrl-C in the terminal reaches the hub only; the hub stops it in order.
        std::os::unix::process::CommandExt::process_group(&mut postgres, 0);
        self.child = Some(postgres.spawn().context("cannot start postgres")?);
        Ok(())
    }

    async fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        for _ in 0..300 {
            if self.accepts_connections().await {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "postgres exited ({status}) during start-up; see {}",
                        self.data_dir.join("postgres.log").display()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("postgres did not accept connections within 30 s")
    }

    async fn accepts_connections(&self) -> bool {
        match self.options("postgres").connect().await {
            Ok(conn) => {
                let _ = conn.close().await;
                true
            }
            Err(_) => false,
        }
    }

    async fn ensure_database(&self) -> anyhow::Result<()> {
        let mut conn = self.options("postgres").connect().await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
                .execute(&mut conn)
                .await?;
        }
        conn.close().await?;
        Ok(())
    }

    /// Connection options for one of the cluster's databases, over its Unix socket.
    pub fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .port(PORT)
            .username(SUPERUSER)
            .database(database)
    }

    /// Connection options for the hub's database.
    pub fn hub_options(&self) -> PgConnectOptions {
        self.options(DATABASE)
    }

    /// A URL for the hub's database, for tools such as psql.
    pub fn url(&self) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{DATABASE}?host={}&port={PORT}",
            self.socket_dir.display()
        )
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether this process started the cluster (rather than finding it running).
    pub fn started_here(&self) -> bool {
        self.child.is_some()
    }

    /// Fast shutdown: open transactions roll back, committed data stays (fsync is on).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = match &self.child {
            Some(child) => Some(child.id() as i32),
            None => read_postmaster_pid(&self.data_dir),
        };
        if let Some(pid) = pid {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGINT) };
            for _ in 0..300 {
                let gone = match self.child.as_mut() {
                    Some(child) => child.try_wait()?.is_some(),
                    // SAFETY: as above; signal 0 only checks that the process exists.
                    None => (unsafe { libc::kill(pid, 0) }) != 0,
                };
                if gone {
                    tracing::info!("local PostgreSQL cluster stopped");
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            bail!("postgres did not stop within 30 s");
        }
        self.child = None;
        Ok(())
    }
}

fn read_postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    path.canonicalize()
        .with_context(|| format!("cannot resolve {}", path.display()))
}

/// Where the PostgreSQL server binaries are: `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`,
/// else `initdb` on the PATH.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    bail!(
        "no PostgreSQL server found: install PostgreSQL (e.g. `apt-get install postgresql`) or set DATABASE_URL"
    )
}

/// `None` when we are not root (the cluster runs as us); otherwise the uid and gid of `postgres` or `nobody`.
fn cluster_owner() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == wanted {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    return Ok(Some((uid, gid)));
                }
            }
        }
    }
    bail!("running as root, and there is no `postgres` or `nobody` user to run PostgreSQL as")
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid);
        command.env("HOME", "/tmp");
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("cannot chown {}", path.display()))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if !entry.file_type()?.is_symlink() {
                chown_tree(&entry.path(), uid, gid)?;
            }
        }
    }
    Ok(())
}

/// PostgreSQL, running as another user, must be able to walk down to its folder.
fn check_reachable(dir: &Path, uid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)?;
        let others_x = meta.mode() & 0o001 != 0;
        if !(others_x || meta.uid() == uid) {
            bail!(
                "{} is not searchable by the PostgreSQL user (uid {uid}); choose another --data-dir or set DATABASE_URL",
                ancestor.display()
            );
        }
    }
    Ok(())
}
