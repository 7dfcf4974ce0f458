//! Connections cut in the middle of a request or a response (a TCP proxy between device and hub): the message is
//! never lost — a C2D message whose delivery never reached the device comes back after its lock, counting that
//! delivery; a D2C message whose acknowledgement was lost is stored, at worst twice when the device retries.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy to `upstream` that passes requests whole and cuts each response after `keep` bytes (usize::MAX: none).
async fn cutting_proxy(
    upstream: std::net::SocketAddr,
    keep: Arc<AtomicUsize>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let keep = keep.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut passed = 0usize;
                let mut buf = [0u8; 4096];
                while let Ok(n) = server_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let allowed = n.min(keep.saturating_sub(passed));
                    if allowed > 0 && client_write.write_all(&buf[..allowed]).await.is_err() {
                        break;
                    }
                    passed += allowed;
                    if passed >= keep {
                        break;
                    }
                }
                // Dropping both halves closes the device's connection mid-response.
                up.abort();
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_delivery_cut_off_mid_response_comes_back_and_counts() {
    let hub = TestHub::start_with(|c| c.c2d.lock_secs = 5).await;
    let device = hub.create_device("cut-1").await;
    let token = device_token("cut-1", &primary_key(&device));
    let owner = hub.owner().await;
    let response = hub
        .request(Method::POST, "/devices/cut-1/commands", &owner)
        .header("iothub-messageid", "cut-msg")
        .header("iothub-ack", "full")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let keep = Arc::new(AtomicUsize::new(20));
    let proxy = cutting_proxy(hub.running().http_addr, keep.clone()).await;
    let via_proxy = reqwest::Client::new();
    let cut = via_proxy
        .get(format!(
            "http://{proxy}/devices/cut-1/messages/deviceBound?api-version=2021-04-12"
        ))
        .header("Authorization", &token)
        .send()
        .await;
    let lost = match cut {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(lost, "the proxy cut the response");

    // The hub handed the message out and locked it: the device cannot see it until the lock runs out...
    let response = hub
        .request(Method::GET, "/devices/cut-1/messages/deviceBound", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    // ...then it comes back, with that lost delivery counted.
    let response = hub
        .request(
            Method::GET,
            "/devices/cut-1/messages/deviceBound?wait-ms=15000",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["iothub-messageid"], "cut-msg");
    assert_eq!(response.headers()["iothub-deliverycount"], "1");
    let lock = response.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let response = hub
        .request(
            Method::DELETE,
            &format!("/devices/cut-1/messages/deviceBound/{lock}"),
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let status: serde_json::Value = hub
        .request(Method::GET, "/devices/cut-1/commands/1", &owner)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["state"], "Completed");
}

#[tokio::test]
async fn telemetry_whose_acknowledgement_was_cut_off_is_stored() {
    let hub = TestHub::start().await;
    let device = hub.create_device("cut-2").await;
    let token = device_token("cut-2", &primary_key(&device));
    let keep = Arc::new(AtomicUsize::new(5));
    let proxy = cutting_proxy(hub.running().http_addr, keep).await;
    let sent = reqwest::Client::new()
        .post(format!(
            "http://{proxy}/devices/cut-2/messages/events?api-version=2021-04-12"
        ))
        .header("Authorization", &token)
        .body("lost-ack")
        .send()
        .await;
    assert!(
        sent.is_err() || sent.unwrap().bytes().await.is_err(),
        "the proxy cut the response"
    );
    // The device does not know: it retries directly.
    let response = hub
        .request(Method::POST, "/devices/cut-2/messages/events", &token)
        .body("lost-ack")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    let copies = hub.events().await.len();
    // Committed before the answer was lost, and again for the retry: a duplicate, never a loss.
    assert_eq!(copies, 2);
}
