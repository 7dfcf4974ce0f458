//! HTTP details that SDKs depend on: IoT Hub's error shape everywhere, exact header casing on the wire,
//! case-insensitive paths, api-version, body limits.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a raw HTTP/1.1 request and returns the raw response head and body, exactly as written by the hub.
async fn raw(hub: &TestHub, request: &str) -> String {
    let addr = hub.running().http_addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn response_header_names_keep_their_exact_case_on_the_wire() {
    let hub = TestHub::start().await;
    hub.create_device("c1").await;
    let token = hub.owner().await;
    let response = raw(
        &hub,
        &format!(
            "GET /devices/c1?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    let head = response.split("\r\n\r\n").next().unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\nETag: \""), "{head}");
    assert!(
        head.contains("\r\nContent-Type: application/json"),
        "{head}"
    );
    assert!(!head.contains("\r\netag:"), "{head}");

    // Errors carry the header in its documented (lower) case.
    let response = raw(
        &hub,
        "GET /devices/c1?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(
        response.contains("\r\niothub-errorcode: IotHubUnauthorizedAccess\r\n"),
        "{response}"
    );
}

#[tokio::test]
async fn literal_path_segments_match_in_any_case() {
    let hub = TestHub::start().await;
    hub.create_device("Case-1").await;
    let token = hub.owner().await;
    for path in [
        "/DEVICES/Case-1",
        "/Devices/Case-1",
        "/STATISTICS/devices",
        "/statistics/Service",
    ] {
        let response = hub.request(Method::GET, path, &token).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // Device ids stay case-sensitive.
    let response = hub
        .request(Method::GET, "/devices/case-1", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "DeviceNotFound").await;
}

#[tokio::test]
async fn api_version_is_required_and_checked() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    let url = |q: &str| format!("{}/devices{q}", hub.base);
    let response = hub
        .http
        .get(url(""))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "InvalidProtocolVersion").await;
    let response = hub
        .http
        .get(url("?api-version=1999-01-01"))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "InvalidProtocolVersion").await;
    for version in ["2016-11-14", "2019-10-01", "2020-09-30", "2021-04-12"] {
        let response = hub
            .http
            .get(url(&format!("?api-version={version}")))
            .header("Authorization", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{version}");
    }
    // Operations endpoints take none.
    let response = hub
        .http
        .get(format!("{}/health/live", hub.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn unknown_routes_methods_and_bodies_answer_in_iot_hub_shape() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    let response = hub
        .request(Method::GET, "/devices/a/b/c/d/e", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
    let response = hub
        .http
        .get(format!("{}/nothing-here", hub.base))
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
    let response = hub
        .request(Method::PATCH, "/devices/a", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 405, "MethodNotAllowed").await;

    let huge = json!({"deviceId": "big", "statusReason": "x".repeat(2 * 1024 * 1024)});
    let response = hub
        .request(Method::PUT, "/devices/big", &token)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_error(response, 413, "MessageTooLarge").await;

    let response = hub
        .request(Method::PUT, "/devices/ct", &token)
        .header("Content-Type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(response, 415, "UnsupportedMediaType").await;

    // Percent-encoding that does not decode to UTF-8 is a client mistake, not a server error.
    let response = hub
        .request(Method::GET, "/devices/%FF%FE", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
}

#[tokio::test]
async fn every_response_has_a_request_id() {
    let hub = TestHub::start().await;
    let response = hub
        .http
        .get(format!("{}/health/live", hub.base))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36);
    let response = hub
        .http
        .get(format!("{}/health/live", hub.base))
        .header("x-request-id", "client-chosen-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-chosen-1");
}

#[tokio::test]
async fn slow_or_oversized_request_heads_are_cut_off() {
    let hub = TestHub::start().await;
    let addr = hub.running().http_addr;

    // Slowloris: half a request head, then silence. The hub closes the connection after its header timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));

    // A header flood larger than the hub reads is refused at once.
    let flood = format!(
        "GET /health/live HTTP/1.1\r\nHost: x\r\nX-Flood: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let response = raw(&hub, &flood).await;
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 431"),
        "{response}"
    );

    // The hub still serves others meanwhile.
    let response = hub
        .http
        .get(format!("{}/health/live", hub.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Sends a raw request with a body and returns the raw response.
async fn raw_with_body(hub: &TestHub, head: &str, body: &str) -> String {
    raw(
        hub,
        &format!(
            "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

#[tokio::test]
async fn application_property_names_keep_the_senders_case() {
    let hub = TestHub::start().await;
    let device = hub.create_device("case-dev").await;
    let owner = hub.owner().await;
    let device_token = device_token("case-dev", &primary_key(&device));

    // Cloud to device: enqueued with mixed-case names, received with the same names on the wire.
    let response = raw_with_body(
        &hub,
        &format!(
            "POST /devices/case-dev/commands?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\nAuthorization: {owner}\r\n\
             iothub-app-Mode: eco\r\nIOTHUB-APP-RoomName: kitchen\r\n"
        ),
        "hello",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let received = raw(
        &hub,
        &format!(
            "GET /devices/case-dev/messages/deviceBound?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\n\
             Authorization: {device_token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert!(
        received.contains("\r\niothub-app-Mode: eco\r\n"),
        "{received}"
    );
    assert!(
        received.contains("\r\niothub-app-RoomName: kitchen\r\n"),
        "{received}"
    );

    // Device to cloud: the stream keeps the names as the device sent them.
    let response = raw_with_body(
        &hub,
        &format!(
            "POST /devices/case-dev/messages/events?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\n\
             Authorization: {device_token}\r\niothub-app-TemperatureAlert: true\r\n"
        ),
        "{}",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 204"), "{response}");
    let events = hub.events().await;
    assert_eq!(events.len(), 1, "the event was stored");
    assert_eq!(events[0]["properties"], json!({"TemperatureAlert": "true"}));
}
