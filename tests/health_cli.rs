//! `iothub health`, the container image's health check: exit 0 only while the hub answers /health/ready with 200.

mod common;

use std::process::Output;

use tokio::process::Command;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_iothub");

/// Runs `iothub health` with only the environment given (as the image's HEALTHCHECK runs it).
async fn health(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .arg("health")
        .args(args)
        .env_remove("IOTHUB_URL")
        .env_remove("IOTHUB_LISTEN");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().await.unwrap()
}

#[tokio::test]
async fn health_follows_the_listener_the_hub_is_configured_with() {
    let hub = TestHub::start().await;
    let port = hub.running().http_addr.port();

    // The image sets IOTHUB_LISTEN=0.0.0.0:8080: a wildcard listener is asked on loopback.
    let wildcard = format!("0.0.0.0:{port}");
    let out = health(&[("IOTHUB_LISTEN", &wildcard)], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ready");

    let out = health(&[], &["--url", &hub.base]).await;
    assert!(out.status.success());

    // Something that answers, but not the readiness endpoint's 200, is not healthy.
    let elsewhere = format!("{}/no-such-prefix", hub.base);
    let out = health(&[], &["--url", &elsewhere]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("answered 404"));

    // A stopped hub is not healthy.
    hub.shutdown().await;
    let out = health(&[("IOTHUB_LISTEN", &wildcard)], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not answer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
