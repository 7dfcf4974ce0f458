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

/// The request head limits the hub gives hyper (`src/http/serve.rs`): the whole head within 10 s, at most 64 KiB.
const HEAD_LIMIT: usize = 64 * 1024;

#[tokio::test]
async fn a_request_head_trickled_in_within_the_header_timeout_is_served() {
    let hub = TestHub::start().await;
    let mut stream = tokio::net::TcpStream::connect(hub.running().http_addr)
        .await
        .unwrap();
    // Eight pieces, half a second apart: about 4 s for the whole head, inside the 10 s allowed.
    let request = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    for piece in request.chunks(request.len().div_ceil(8)) {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut out),
    )
    .await
    .expect("answered")
    .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn a_request_head_still_unfinished_after_the_header_timeout_is_cut_off() {
    let hub = TestHub::start().await;
    let stream = tokio::net::TcpStream::connect(hub.running().http_addr)
        .await
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = read.read_to_end(&mut out).await;
        out
    });
    // Slowloris: one more header line every half second, never the end of the head. (Twenty lines stay far
    // below hyper's header count and size limits: only the timeout can end this.)
    for _ in 0..60 {
        if reader.is_finished() || write.write_all(b"X-Slow: a\r\n").await.is_err() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
        .await
        .expect("the hub closed the connection")
        .unwrap();
    assert!(
        out.is_empty(),
        "cut off without an answer: {}",
        String::from_utf8_lossy(&out)
    );

    // The hub still serves others.
    let response = hub
        .http
        .get(format!("{}/health/live", hub.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// A request head of exactly `len` bytes: one padding header, ended by the blank line when `finished`.
fn head_of(len: usize, finished: bool) -> String {
    let start = "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ";
    let end = if finished { "\r\n\r\n" } else { "" };
    let head = format!("{start}{}{end}", "a".repeat(len - start.len() - end.len()));
    assert_eq!(head.len(), len);
    head
}

#[tokio::test]
async fn request_heads_are_read_up_to_64_kib_and_refused_with_431_beyond() {
    let hub = TestHub::start().await;
    let response = raw(&hub, &head_of(HEAD_LIMIT - 1, true)).await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{}",
        &response[..response.len().min(200)]
    );

    // A head that reaches the limit without ending. (The hub has read every byte sent when it answers, so the
    // answer is not lost to a connection reset.)
    let response = raw(&hub, &head_of(HEAD_LIMIT, false)).await;
    assert!(
        response.starts_with("HTTP/1.1 431"),
        "{}",
        &response[..response.len().min(200)]
    );

    let response = hub
        .http
        .get(format!("{}/health/live", hub.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn location_content_encoding_and_retry_after_keep_their_case_on_the_wire() {
    let hub = TestHub::start_with(|c| c.throttle.c2d_send = Some(0.01)).await;
    let device = hub.create_device("spelled").await;
    let owner = hub.owner().await;
    let token = device_token("spelled", &primary_key(&device));
    let send = format!(
        "POST /devices/spelled/commands?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\nAuthorization: {owner}\r\n\
         iothub-contentencoding: utf-8\r\n"
    );
    let response = raw_with_body(&hub, &send, "hello").await;
    let head = response.split("\r\n\r\n").next().unwrap();
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    assert!(
        head.contains("\r\nLocation: /devices/spelled/commands/"),
        "{head}"
    );

    let received = raw(
        &hub,
        &format!(
            "GET /devices/spelled/messages/deviceBound?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\n\
             Authorization: {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    let head = received.split("\r\n\r\n").next().unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("\r\nContentEncoding: utf-8\r\n"), "{head}");

    // The C2D send limit (one, then none for 100 s) is spent: the next send is throttled.
    let response = raw_with_body(&hub, &send, "again").await;
    let head = response.split("\r\n\r\n").next().unwrap();
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(head.contains("\r\nRetry-After: "), "{head}");
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
