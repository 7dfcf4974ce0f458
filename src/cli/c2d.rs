//! `iothub c2d ...` and `iothub feedback watch`: thin clients of the REST API.

use anyhow::{bail, Context};
use clap::Subcommand;
use reqwest::Method;

use super::client::HubClient;
use crate::http::routes::feedback::FeedbackRecord;

#[derive(Subcommand)]
pub enum C2dCommand {
    /// Enqueue a message for a device; prints its id, sequence number and expiry.
    Send {
        device: String,
        /// The body, as text.
        #[arg(long, default_value = "")]
        body: String,
        /// Feedback wanted: none, positive, negative, full.
        #[arg(long)]
        ack: Option<String>,
        /// Time to live in seconds.
        #[arg(long, conflicts_with = "expiry")]
        ttl: Option<u32>,
        /// Absolute expiry, RFC 3339.
        #[arg(long)]
        expiry: Option<String>,
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long)]
        correlation_id: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
        /// An application property, `name=value` (repeatable).
        #[arg(long = "property", value_name = "NAME=VALUE")]
        properties: Vec<String>,
    },
    /// List a device's live messages.
    List {
        device: String,
        #[arg(long, default_value_t = 100)]
        top: u32,
    },
    /// Print one message's state and outcome.
    Status {
        device: String,
        sequence_number: i64,
    },
    /// Purge a device's queue.
    Purge { device: String },
}

#[derive(Subcommand)]
pub enum FeedbackCommand {
    /// Receive feedback batches (long-polling), print each record as a JSON line, and complete the batches.
    Watch {
        /// Stop after this many records (default: run until interrupted).
        #[arg(long)]
        count: Option<usize>,
        /// Long-poll wait per receive, in milliseconds (at most 30000).
        #[arg(long, default_value_t = 20_000)]
        wait_ms: u64,
    },
}

async fn text(response: reqwest::Response) -> anyhow::Result<String> {
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("the hub answered {status}: {body}");
    }
    Ok(body)
}

fn pretty(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| body.to_string())
}

pub async fn c2d(client: &HubClient, command: C2dCommand) -> anyhow::Result<()> {
    match command {
        C2dCommand::Send {
            device,
            body,
            ack,
            ttl,
            expiry,
            message_id,
            correlation_id,
            content_type,
            properties,
        } => {
            let mut headers = Vec::new();
            let mut add = |name: &str, value: Option<String>| {
                if let Some(v) = value {
                    headers.push((name.to_string(), v));
                }
            };
            add("iothub-ack", ack);
            add("iothub-ttl", ttl.map(|t| t.to_string()));
            add("iothub-expiry", expiry);
            add("iothub-messageid", message_id);
            add("iothub-correlationid", correlation_id);
            add("iothub-contenttype", content_type);
            for property in properties {
                let (name, value) = property
                    .split_once('=')
                    .context("a property is NAME=VALUE")?;
                headers.push((format!("iothub-app-{name}"), value.to_string()));
            }
            let path = format!("{}/commands", HubClient::device_path(&device));
            let response = client
                .call_raw(Method::POST, &path, &headers, body.into_bytes())
                .await?;
            println!("{}", pretty(&text(response).await?));
        }
        C2dCommand::List { device, top } => {
            let path = format!("{}/commands?top={top}", HubClient::device_path(&device));
            let response = client.call_raw(Method::GET, &path, &[], Vec::new()).await?;
            println!("{}", pretty(&text(response).await?));
        }
        C2dCommand::Status {
            device,
            sequence_number,
        } => {
            let path = format!(
                "{}/commands/{sequence_number}",
                HubClient::device_path(&device)
            );
            let response = client.call_raw(Method::GET, &path, &[], Vec::new()).await?;
            println!("{}", pretty(&text(response).await?));
        }
        C2dCommand::Purge { device } => {
            let path = format!("{}/commands", HubClient::device_path(&device));
            let response = client
                .call_raw(Method::DELETE, &path, &[], Vec::new())
                .await?;
            println!("{}", pretty(&text(response).await?));
        }
    }
    Ok(())
}

pub async fn feedback(client: &HubClient, command: FeedbackCommand) -> anyhow::Result<()> {
    let FeedbackCommand::Watch { count, wait_ms } = command;
    let mut seen = 0usize;
    loop {
        let path = format!("/messages/serviceBound/feedback?wait-ms={wait_ms}");
        let response = client.call_raw(Method::GET, &path, &[], Vec::new()).await?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            continue;
        }
        let token = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(|t| t.trim_matches('"').to_string())
            .context("a feedback batch without an ETag")?;
        let records: Vec<FeedbackRecord> = serde_json::from_str(&text(response).await?)?;
        for record in &records {
            println!("{}", serde_json::to_string(record)?);
        }
        let done = client
            .call_raw(
                Method::DELETE,
                &format!("/messages/serviceBound/feedback/{token}"),
                &[],
                Vec::new(),
            )
            .await?;
        text(done).await?;
        seen += records.len();
        if count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
}
