//! The `iothub` command against a running hub: tokens, policies and device management from a terminal.

mod common;

use std::process::Output;

use tokio::process::Command;

use common::*;
use reqwest::Method;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_iothub");

/// Runs the command without blocking the runtime that serves the hub.
async fn iothub(hub: &TestHub, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", hub.database_url())
        .env("IOTHUB_HOSTNAME", HOST)
        .env("IOTHUB_URL", &hub.base)
        .env_remove("IOTHUB_CONNECTION_STRING")
        .output()
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test]
async fn tokens_from_the_cli_carry_their_policy_rights() {
    let hub = TestHub::start().await;
    hub.create_device("cli-dev").await;
    let owner = stdout(&iothub(&hub, &["token"]).await).trim().to_string();
    let response = hub
        .request(Method::GET, "/devices/cli-dev", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let service = stdout(&iothub(&hub, &["token", "--policy", "service", "--ttl", "60"]).await)
        .trim()
        .to_string();
    assert!(service.contains("&skn=service"));
    let response = hub
        .request(Method::GET, "/devices/cli-dev", &service)
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;

    let device = stdout(&iothub(&hub, &["token", "--device", "cli-dev"]).await)
        .trim()
        .to_string();
    assert!(!device.contains("skn="));
    let target = vec!["devices".to_string(), "cli-dev".to_string()];
    iothub::auth::authorize_device(
        &iothub::auth::Credentials::uncached(hub.db.clone()),
        HOST,
        Some(&device),
        "cli-dev",
        &target,
    )
    .await
    .unwrap();

    let out = iothub(&hub, &["token", "--policy", "nope"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no policy nope"));

    let listed = stdout(&iothub(&hub, &["policy", "list"]).await);
    let owner_key = hub.policy_key("iothubowner").await;
    assert!(listed.lines().any(|l| l
        == format!("HostName={HOST};SharedAccessKeyName=iothubowner;SharedAccessKey={owner_key}")));
}

#[tokio::test]
async fn devices_are_managed_through_the_rest_api() {
    let hub = TestHub::start().await;
    let created = iothub(&hub, &["device", "create", "cli-1"]).await;
    let device: Value = serde_json::from_str(&stdout(&created)).unwrap();
    assert_eq!(device["deviceId"], "cli-1");
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(
        stderr.contains(&format!(
            "HostName={HOST};DeviceId=cli-1;SharedAccessKey={}",
            primary_key(&device)
        )),
        "{stderr}"
    );
    iothub(&hub, &["device", "create", "cli-2", "--disabled"]).await;

    let fetched: Value =
        serde_json::from_str(&stdout(&iothub(&hub, &["device", "get", "cli-1"]).await)).unwrap();
    assert_eq!(fetched["etag"], device["etag"]);
    assert_eq!(
        stdout(&iothub(&hub, &["device", "list"]).await),
        "cli-1\tenabled\ncli-2\tdisabled\n"
    );
    stdout(&iothub(&hub, &["device", "delete", "cli-1"]).await);
    let out = iothub(&hub, &["device", "get", "cli-1"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DeviceNotFound"));

    // An explicit connection string of a policy without RegistryWrite is refused by the hub.
    let read_only = format!(
        "HostName={HOST};SharedAccessKeyName=registryRead;SharedAccessKey={}",
        hub.policy_key("registryRead").await
    );
    let out = iothub(
        &hub,
        &[
            "device",
            "create",
            "cli-3",
            "--connection-string",
            &read_only,
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}
