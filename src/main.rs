//! The `iothub` command: the hub itself (`serve`) and small tools around it.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;
use sqlx::PgPool;

use iothub::auth::{policies, sas};
use iothub::cli::client::{ConnectionString, HubClient};
use iothub::postgres::{self, ManagedCluster};
use iothub::registry::{self, DeviceId};
use iothub::{Config, Listeners};

/// mimalloc instead of the C library's allocator: a profile of telemetry sends found 17 % of the hub's CPU in
/// glibc's malloc (its consolidation and free-list walks). The benchmarks use the same one, so they measure what
/// ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "iothub",
    version,
    about = "A self-hosted IoT messaging hub, wire-compatible with Azure IoT Hub's HTTPS API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub. With no DATABASE_URL it runs its own PostgreSQL under ./data/postgres.
    Serve(Box<Config>),
    /// Apply the database migrations and create the default policies, then exit.
    Migrate(DbArgs),
    /// Shared access policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print a SAS token for a policy or a device.
    Token(TokenArgs),
    /// Manage devices through the hub's REST API.
    Device {
        #[command(flatten)]
        hub: HubArgs,
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Cloud-to-device messages through the hub's REST API.
    C2d {
        #[command(flatten)]
        hub: HubArgs,
        #[command(subcommand)]
        command: iothub::cli::c2d::C2dCommand,
    },
    /// Delivery feedback through the hub's REST API.
    Feedback {
        #[command(flatten)]
        hub: HubArgs,
        #[command(subcommand)]
        command: iothub::cli::c2d::FeedbackCommand,
    },
    /// Print the hub's local CA certificate (PEM), which devices trust when no TLS certificate is configured;
    /// created under `<data-dir>/tls` if the hub has not created it yet.
    Ca(CaArgs),
    /// Print the OpenAPI document.
    Openapi,
    /// Exit 0 when a running hub answers /health/ready, 1 otherwise (the container image's health check).
    Health(HealthArgs),
    /// Print device-to-cloud events as they arrive, like `az iot hub monitor-events`.
    Monitor {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: iothub::cli::d2c::MonitorArgs,
    },
    /// Send telemetry as a device (a device connection string, or --device with its key read from the database).
    Send {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: iothub::cli::d2c::SendArgs,
    },
}

#[derive(Args, Clone)]
struct DbArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<secrecy::SecretString>,
    #[arg(long, env = "IOTHUB_DATA_DIR", default_value = "./data")]
    data_dir: std::path::PathBuf,
    #[arg(long, env = "IOTHUB_HOSTNAME", default_value = "localhost")]
    hostname: String,
}

#[derive(Args)]
struct CaArgs {
    #[arg(long, env = "IOTHUB_DATA_DIR", default_value = "./data")]
    data_dir: std::path::PathBuf,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// One connection string per policy, in IoT Hub's form.
    List(DbArgs),
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Sign with this policy's key (default: iothubowner).
    #[arg(long, conflicts_with = "device")]
    policy: Option<String>,
    /// Sign with this device's key instead; the token's scope is the device.
    #[arg(long)]
    device: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: i64,
    /// Sign with the secondary key.
    #[arg(long)]
    secondary: bool,
}

#[derive(Args)]
struct HubArgs {
    /// The hub's base URL.
    #[arg(
        long,
        env = "IOTHUB_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// A service connection string with RegistryWrite; default: the iothubowner policy read from the database.
    #[arg(
        long,
        env = "IOTHUB_CONNECTION_STRING",
        hide_env_values = true,
        global = true
    )]
    connection_string: Option<String>,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Args)]
struct HealthArgs {
    /// The hub's base URL. Default: the plain HTTP listener IOTHUB_LISTEN names, on loopback if it is a wildcard.
    #[arg(long, env = "IOTHUB_URL")]
    url: Option<String>,
    #[arg(
        long,
        env = "IOTHUB_LISTEN",
        default_value = "127.0.0.1:8080",
        hide = true
    )]
    listen: std::net::SocketAddr,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device (keys are generated) and print it with its connection string.
    Create {
        id: String,
        #[arg(long)]
        disabled: bool,
    },
    /// Print a device.
    Get { id: String },
    /// List devices.
    List {
        #[arg(long, default_value_t = 1000)]
        top: u32,
    },
    /// Delete a device.
    Delete { id: String },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Serve(c) if c.log_json);
    init_tracing(json);
    if let Err(error) = run(cli).await {
        eprintln!("iothub: {error:#}");
        std::process::exit(1);
    }
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The database a command should use: `DATABASE_URL`, or the managed local cluster (started, or adopted when a
/// hub already runs it).
async fn open_database(
    database_url: Option<&secrecy::SecretString>,
    data_dir: &std::path::Path,
    pool_size: u32,
) -> anyhow::Result<(PgPool, Option<ManagedCluster>)> {
    match database_url {
        Some(url) => {
            let options = postgres::parse_url(url.expose_secret())?;
            let pool = postgres::connect(options, pool_size)
                .await
                .with_context(|| {
                    format!(
                        "DATABASE_URL {}",
                        iothub::config::redact_url(url.expose_secret())
                    )
                })?;
            Ok((pool, None))
        }
        None => {
            let cluster = ManagedCluster::start(&data_dir.join("postgres")).await?;
            let pool = postgres::connect(cluster.hub_options(), pool_size).await?;
            Ok((pool, Some(cluster)))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => serve(*config).await,
        Command::Migrate(db) => {
            let (pool, cluster) = open_database(db.database_url.as_ref(), &db.data_dir, 2).await?;
            iothub::prepare_database(&pool).await?;
            pool.close().await;
            println!("database migrated");
            release(cluster).await
        }
        Command::Policy {
            command: PolicyCommand::List(db),
        } => {
            let (pool, cluster) = open_database(db.database_url.as_ref(), &db.data_dir, 2).await?;
            iothub::prepare_database(&pool).await?;
            for policy in policies::list(&pool).await? {
                println!("{}", policy.connection_string(&db.hostname));
            }
            pool.close().await;
            release(cluster).await
        }
        Command::Token(args) => token_command(args).await,
        Command::Device { hub, command } => device_command(hub, command).await,
        Command::C2d { hub, command } => {
            iothub::cli::c2d::c2d(&service_client(&hub).await?, command).await
        }
        Command::Feedback { hub, command } => {
            iothub::cli::c2d::feedback(&service_client(&hub).await?, command).await
        }
        Command::Monitor { hub, args } => {
            let credentials = service_credentials(&hub).await?;
            iothub::cli::d2c::monitor(&hub.url, credentials, args).await
        }
        Command::Send { hub, args } => {
            let credentials = device_credentials(&hub, &args).await?;
            iothub::cli::d2c::send(&hub.url, credentials, args).await
        }
        Command::Health(args) => health(args).await,
        Command::Ca(args) => {
            print!("{}", iothub::tls::LocalCa::open(&args.data_dir)?.ca_pem());
            Ok(())
        }
        Command::Openapi => {
            println!("{}", iothub::http::openapi().to_pretty_json()?);
            Ok(())
        }
    }
}

/// Prints a SAS token signed with a device's key (`--device`) or a policy's (default: iothubowner).
async fn token_command(args: TokenArgs) -> anyhow::Result<()> {
    let (pool, cluster) =
        open_database(args.db.database_url.as_ref(), &args.db.data_dir, 2).await?;
    iothub::prepare_database(&pool).await?;
    let expiry = chrono::Utc::now().timestamp() + args.ttl;
    let token = match &args.device {
        Some(id) => {
            let device = registry::store::get(&pool, &id.parse::<DeviceId>()?)
                .await?
                .with_context(|| format!("no device {id}"))?;
            let key = if args.secondary {
                device.secondary_key
            } else {
                device.primary_key
            }
            .with_context(|| format!("device {id} has no symmetric key"))?;
            sas::sign(
                &format!("{}/devices/{id}", args.db.hostname),
                &key,
                None,
                expiry,
            )?
        }
        None => {
            let name = args.policy.as_deref().unwrap_or("iothubowner");
            let policy = policies::get(&pool, name)
                .await?
                .with_context(|| format!("no policy {name}"))?;
            let key = if args.secondary {
                &policy.secondary_key
            } else {
                &policy.primary_key
            };
            sas::sign(&args.db.hostname, key, Some(name), expiry)?
        }
    };
    println!("{token}");
    pool.close().await;
    release(cluster).await
}

/// Asks a running hub whether it is ready: `Ok` on 200 from `/health/ready`, an error (exit status 1) otherwise.
async fn health(args: HealthArgs) -> anyhow::Result<()> {
    let url = match args.url {
        Some(url) => url,
        None => {
            // A hub listening on every interface is reached on loopback.
            let mut addr = args.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            format!("http://{addr}")
        }
    };
    let url = format!("{}/health/ready", url.trim_end_matches('/'));
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} does not answer"))?;
    let status = response.status();
    if status != reqwest::StatusCode::OK {
        let body = response.text().await.unwrap_or_default();
        bail!("{url} answered {status}: {body}");
    }
    println!("ready");
    Ok(())
}

/// Stops the managed cluster only if this command started it (a running hub keeps its own).
async fn release(cluster: Option<ManagedCluster>) -> anyhow::Result<()> {
    match cluster {
        Some(cluster) if cluster.started_here() => cluster.stop().await,
        _ => Ok(()),
    }
}

async fn device_command(hub: HubArgs, command: DeviceCommand) -> anyhow::Result<()> {
    let client = service_client(&hub).await?;
    let hostname = client.credentials.host_name.clone();
    match command {
        DeviceCommand::Create { id, disabled } => {
            let device = client.create_device(&id, disabled).await?;
            println!("{}", serde_json::to_string_pretty(&device)?);
            if let Some(key) = device
                .authentication
                .symmetric_key
                .as_ref()
                .and_then(|k| k.primary_key.as_ref())
            {
                eprintln!(
                    "connection string: HostName={hostname};DeviceId={id};SharedAccessKey={key}"
                );
            }
        }
        DeviceCommand::Get { id } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&client.get_device(&id).await?)?
            )
        }
        DeviceCommand::List { top } => {
            for device in client.list_devices(top).await? {
                println!("{}\t{}", device.device_id, device.status);
            }
        }
        DeviceCommand::Delete { id } => {
            client.delete_device(&id).await?;
            println!("deleted {id}");
        }
    }
    Ok(())
}

/// A client of the hub's REST API with the service credentials `hub` names (default: the iothubowner policy).
async fn service_client(hub: &HubArgs) -> anyhow::Result<HubClient> {
    HubClient::new(&hub.url, service_credentials(hub).await?)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Caught from the first moment: until a handler is installed, SIGTERM's default action kills the process
    // outright, cutting requests off mid-answer and leaving a managed PostgreSQL running. One that arrives while
    // the hub starts is acted on as soon as it serves.
    let shutdown = shutdown_signal()?;
    tracing::info!(config = %config, "starting");
    let (pool, cluster) = open_database(
        config.database_url.as_ref(),
        &config.data_dir,
        config.db_pool_size,
    )
    .await?;
    let listeners = Listeners::bind(&config).await?;
    let hub = iothub::launch(config, pool.clone(), listeners, shutdown).await?;
    let result = hub.wait().await;
    pool.close().await;
    if let Some(cluster) = cluster {
        // Give it a moment: connections closing is asynchronous on the server side.
        tokio::time::sleep(Duration::from_millis(50)).await;
        cluster.stop().await?;
    }
    result
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on the first of either, also one that came
/// before it was polled.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}

/// A service connection string: `--connection-string`, or the iothubowner policy read from the database.
async fn service_credentials(hub: &HubArgs) -> anyhow::Result<ConnectionString> {
    if let Some(text) = &hub.connection_string {
        let credentials = ConnectionString::parse(text)?;
        if credentials.device_id.is_some() {
            bail!("this command needs a service connection string, not a device's");
        }
        return Ok(credentials);
    }
    let (pool, cluster) = open_database(hub.db.database_url.as_ref(), &hub.db.data_dir, 1).await?;
    let policy = policies::get(&pool, "iothubowner")
        .await?
        .context("no iothubowner policy: pass --connection-string")?;
    pool.close().await;
    release(cluster).await?;
    ConnectionString::parse(&policy.connection_string(&hub.db.hostname))
}

/// A device's credentials: `--device-connection-string`, or `--device` with its key read from the database.
async fn device_credentials(
    hub: &HubArgs,
    args: &iothub::cli::d2c::SendArgs,
) -> anyhow::Result<ConnectionString> {
    if let Some(text) = &args.device_connection_string {
        return ConnectionString::parse(text);
    }
    let id = args
        .device
        .as_deref()
        .context("pass --device-connection-string or --device")?;
    let (pool, cluster) = open_database(hub.db.database_url.as_ref(), &hub.db.data_dir, 1).await?;
    let device = registry::store::get(&pool, &id.parse::<DeviceId>()?)
        .await?
        .with_context(|| format!("no device {id}"))?;
    pool.close().await;
    release(cluster).await?;
    Ok(ConnectionString {
        host_name: hub.db.hostname.clone(),
        key_name: None,
        device_id: Some(id.to_string()),
        key: device
            .primary_key
            .with_context(|| format!("device {id} has no symmetric key"))?,
    })
}
