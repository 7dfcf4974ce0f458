//! A hub process killed with SIGKILL in the middle of ingestion loses no acknowledged message: `204` is only sent
//! after the message's transaction has committed.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use common::*;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

const API: &str = "api-version=2021-04-12";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `iothub serve` on `port` against `url` and waits until it is ready.
async fn spawn_hub(url: &str, port: u16, http: &reqwest::Client) -> Child {
    let data_dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("d2c-crash-{port}"));
    let child = Command::new(env!("CARGO_BIN_EXE_iothub"))
        .arg("serve")
        .env("DATABASE_URL", url)
        .env("IOTHUB_LISTEN", format!("127.0.0.1:{port}"))
        .env("IOTHUB_HOSTNAME", HOST)
        .env("IOTHUB_DATA_DIR", data_dir)
        // Never IoT Hub's 8883: tests run side by side.
        .env("IOTHUB_MQTTS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the hub binary");
    for _ in 0..300 {
        if let Ok(response) = http
            .get(format!("http://127.0.0.1:{port}/health/ready"))
            .send()
            .await
        {
            if response.status().is_success() {
                return child;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the hub did not become ready");
}

#[tokio::test]
async fn sigkill_during_ingestion_loses_no_acknowledged_message() {
    let db = TestDb::create().await;
    let url = db.url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let port = free_port();
    let mut hub = spawn_hub(&url, port, &http).await;
    let base = format!("http://127.0.0.1:{port}");

    let pool = db.pool().await;
    let owner_key = iothub::auth::policies::get(&pool, "iothubowner")
        .await
        .unwrap()
        .unwrap()
        .primary_key;
    let owner =
        iothub::auth::sas::sign(HOST, &owner_key, Some("iothubowner"), now() + 3600).unwrap();
    let mut devices = Vec::new();
    for i in 0..8 {
        let id = format!("crash-{i}");
        let response = http
            .put(format!("{base}/devices/{id}?{API}"))
            .header("Authorization", &owner)
            .json(&json!({"deviceId": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let device: Value = response.json().await.unwrap();
        devices.push((id.clone(), device_token(&id, &primary_key(&device))));
    }

    // Senders record every 204; they stop at the first failure (the hub is gone).
    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for (id, token) in devices.clone() {
        let http = http.clone();
        let base = base.clone();
        let acked_total = acked_total.clone();
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0.. {
                let sent = http
                    .post(format!("{base}/devices/{id}/messages/events?{API}"))
                    .header("Authorization", &token)
                    .body(format!("{n}"))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status() == 204 => {
                        acked.push(n);
                        acked_total.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
            (id, acked)
        }));
    }
    // Let load build up, then kill -9 in the middle of it.
    while acked_total.load(Ordering::Relaxed) < 1000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.start_kill().unwrap();
    hub.wait().await.unwrap();
    let mut acked: HashMap<String, Vec<usize>> = HashMap::new();
    for sender in senders {
        let (id, numbers) = sender.await.unwrap();
        acked.insert(id, numbers);
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total >= 1000);

    // Restart on the same database and read every partition from the start.
    let port = free_port();
    let mut hub = spawn_hub(&url, port, &http).await;
    let base = format!("http://127.0.0.1:{port}");
    let service_key = iothub::auth::policies::get(&pool, "service")
        .await
        .unwrap()
        .unwrap()
        .primary_key;
    let service =
        iothub::auth::sas::sign(HOST, &service_key, Some("service"), now() + 3600).unwrap();
    let mut stored: HashMap<String, Vec<usize>> = HashMap::new();
    for p in 0..4 {
        let mut from = 0;
        loop {
            let page: Value = http
                .get(format!("{base}/messages/events/partitions/{p}?{API}&from-sequence-number={from}&max-count=1000"))
                .header("Authorization", &service)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let events = page["events"].as_array().unwrap();
            if events.is_empty() {
                break;
            }
            for e in events {
                assert_eq!(
                    e["sequenceNumber"].as_i64().unwrap(),
                    from,
                    "no gaps in partition {p}"
                );
                from += 1;
                let body =
                    String::from_utf8(BASE64.decode(e["body"].as_str().unwrap()).unwrap()).unwrap();
                stored
                    .entry(e["deviceId"].as_str().unwrap().to_string())
                    .or_default()
                    .push(body.parse().unwrap());
            }
        }
    }
    for (id, numbers) in &acked {
        let kept = stored.get(id).cloned().unwrap_or_default();
        let kept_set: HashSet<usize> = kept.iter().copied().collect();
        let lost: Vec<usize> = numbers
            .iter()
            .copied()
            .filter(|n| !kept_set.contains(n))
            .collect();
        assert!(lost.is_empty(), "{id}: acknowledged but lost {lost:?}");
        // Per device in order; at most the one unacknowledged in-flight message beyond the acknowledged ones.
        let mut sorted = kept.clone();
        sorted.sort();
        assert_eq!(kept, sorted, "{id} out of order");
        assert!(kept.len() <= numbers.len() + 1);
    }
    // The restarted hub accepts sends again, continuing the sequence.
    let (id, token) = &devices[0];
    let response = http
        .post(format!("{base}/devices/{id}/messages/events?{API}"))
        .header("Authorization", token)
        .body("after restart")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    hub.start_kill().unwrap();
    hub.wait().await.unwrap();
}
