//! `iothub monitor` and `iothub send`: trying telemetry out in a terminal.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::client::{ConnectionString, API_VERSION};

#[derive(Args, Debug, Clone)]
pub struct MonitorArgs {
    /// Consumer group to read through.
    #[arg(long, default_value = "$Default")]
    pub consumer_group: String,
    /// Start after the group's checkpoints instead of with events that arrive from now on.
    #[arg(long)]
    pub from_checkpoint: bool,
    /// Only events of this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Show system and application properties too.
    #[arg(long)]
    pub properties: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct SendArgs {
    /// The device's connection string (`HostName=...;DeviceId=...;SharedAccessKey=...`).
    #[arg(long, env = "IOTHUB_DEVICE_CONNECTION_STRING", hide_env_values = true)]
    pub device_connection_string: Option<String>,
    /// Send as this device, its key read from the database (like `iothub token --device`).
    #[arg(long)]
    pub device: Option<String>,
    /// Application property `name=value` (repeatable).
    #[arg(long = "property", short = 'p')]
    pub properties: Vec<String>,
    /// The message's content type (`iothub-contenttype`).
    #[arg(long, default_value = "application/json")]
    pub content_type: String,
    /// Send the body this many times.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Pause between sends, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// The message body.
    pub body: String,
}

fn url(base: &str, path: &str) -> String {
    format!(
        "{}{path}?api-version={API_VERSION}",
        base.trim_end_matches('/')
    )
}

/// Sends `args.body` as the device of `credentials`.
pub async fn send(base: &str, credentials: ConnectionString, args: SendArgs) -> anyhow::Result<()> {
    let id = credentials
        .device_id
        .clone()
        .context("sending needs a device's connection string")?;
    let http = reqwest::Client::new();
    let path = format!("{}/messages/events", crate::http::wire::device_path(&id));
    for n in 0..args.count {
        let mut request = http
            .post(url(base, &path))
            .header("Authorization", credentials.token(3600)?)
            .header("iothub-contenttype", &args.content_type)
            .header("iothub-messageid", uuid::Uuid::new_v4().to_string())
            .body(args.body.clone());
        for property in &args.properties {
            let (name, value) = property
                .split_once('=')
                .context("properties are name=value")?;
            request = request.header(format!("iothub-app-{name}"), value);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {base}"))?;
        if response.status() != 204 {
            bail!(
                "the hub answered {}: {}",
                response.status(),
                response.text().await?
            );
        }
        if n + 1 < args.count && args.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
    }
    eprintln!("sent {} message(s) as {id}", args.count);
    Ok(())
}

/// The way `az iot hub monitor-events` prints an event: the body parsed, else as text, else in base64 (the one form
/// a `body=decoded` read gives).
pub fn render(event: &Value, with_properties: bool) -> Value {
    let payload = event
        .get("bodyJson")
        .or_else(|| event.get("bodyText"))
        .cloned()
        .unwrap_or_else(|| event["body"].clone());
    let system = &event["systemProperties"];
    let mut out = json!({
        "origin": event["deviceId"],
        "module": "",
        "interface": system.get("iothub-interface-id").cloned().unwrap_or(json!("")),
        "component": system.get("dt-subject").cloned().unwrap_or(json!("")),
        "payload": payload,
    });
    if with_properties {
        out["properties"] = json!({
            "system": system,
            "application": event["properties"],
            "partition": event["partitionId"],
            "sequenceNumber": event["sequenceNumber"],
        });
    }
    json!({"event": out})
}

/// Every partition's last sequence number, in the stream's `Last-Event-ID` form: a stream from there starts at the
/// end.
async fn end_position(
    http: &reqwest::Client,
    base: &str,
    credentials: &ConnectionString,
) -> anyhow::Result<String> {
    let info: Value = http
        .get(url(base, "/messages/events"))
        .header("Authorization", credentials.token(3600)?)
        .send()
        .await
        .with_context(|| format!("cannot reach the hub at {base}"))?
        .error_for_status()?
        .json()
        .await?;
    let positions: Vec<String> = info["partitions"]
        .as_array()
        .context("unexpected endpoint answer")?
        .iter()
        .map(|p| {
            format!(
                "{}:{}",
                p["partitionId"].as_str().unwrap_or("0"),
                p["lastSequenceNumber"].as_i64().unwrap_or(-1)
            )
        })
        .collect();
    Ok(positions.join(","))
}

/// One Server-Sent Events frame: its id (when it has one) and its data parsed as JSON (when it parses).
fn parse_frame(frame: &str) -> (Option<String>, Option<Value>) {
    let mut id = None;
    let mut data = None;
    for line in frame.lines() {
        if let Some(i) = line.strip_prefix("id:") {
            id = Some(i.trim().to_string());
        } else if let Some(d) = line.strip_prefix("data:") {
            data = serde_json::from_str::<Value>(d.trim()).ok();
        }
    }
    (id, data)
}

/// Prints events from the consumer group's Server-Sent Events stream until interrupted (or `count` events).
pub async fn monitor(
    base: &str,
    credentials: ConnectionString,
    args: MonitorArgs,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut last_event_id = match args.from_checkpoint {
        true => None,
        false => Some(end_position(&http, base, &credentials).await?),
    };
    eprintln!("Starting event monitor, use ctrl-c to stop...");
    let mut printed = 0u64;
    let group = crate::auth::sas::encode_component(&args.consumer_group);
    let path = format!("/messages/events/consumerGroups/{group}/stream");
    // Reconnects with the last id seen when the connection drops (e.g. the hub restarts).
    loop {
        // Each body in the one form `render` prints, so the hub encodes nothing else.
        let mut request = http
            .get(format!("{}&body=decoded", url(base, &path)))
            .header("Authorization", credentials.token(3600)?);
        if let Some(id) = &last_event_id {
            request = request.header("Last-Event-ID", id.as_str());
        }
        let mut response = match request.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => bail!("the hub answered {}: {}", r.status(), r.text().await?),
            Err(error) => {
                eprintln!("connection failed ({error}); retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let (id, event) = parse_frame(&frame);
                last_event_id = id.or(last_event_id);
                let Some(event) = event else { continue };
                if args
                    .device
                    .as_ref()
                    .is_some_and(|d| event["deviceId"] != *d)
                {
                    continue;
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&render(&event, args.properties))?
                );
                printed += 1;
                if args.count.is_some_and(|c| printed >= c) {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
