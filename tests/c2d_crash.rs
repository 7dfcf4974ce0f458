//! A hub process killed with SIGKILL while devices receive and the service sends loses no acknowledged message:
//! after a restart every enqueued message is completed or dead-lettered, with its feedback, and every completion
//! the hub acknowledged stands.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DEVICES: usize = 4;
const INITIAL: usize = 30;

#[derive(Default)]
struct Ledger {
    /// Message ids the hub answered 201 for.
    enqueued: BTreeSet<String>,
    /// (device, sequence number) of completions the hub answered 204 for.
    completed: BTreeSet<(String, i64)>,
}

#[tokio::test]
async fn a_killed_hub_loses_no_message() {
    let db = TestDb::create().await;
    let url = db.url();
    let data_dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("crash-{}", db.name));
    let first = HubProcess::start(&url, &data_dir).await;
    let pool = db.pool().await;
    let key = |name: &'static str| {
        let pool = pool.clone();
        async move {
            iothub::auth::policies::get(&pool, name)
                .await
                .unwrap()
                .unwrap()
                .primary_key
        }
    };
    let owner = iothub::auth::sas::sign(
        HOST,
        &key("iothubowner").await,
        Some("iothubowner"),
        now() + 3600,
    )
    .unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = Arc::new(Mutex::new(first.base.clone()));
    let url_of = |path: &str| {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{}{path}{sep}api-version=2021-04-12", base.lock().unwrap())
    };

    let mut tokens = HashMap::new();
    for d in 0..DEVICES {
        let id = format!("dev-{d}");
        let device: Value = http
            .put(url_of(&format!("/devices/{id}")))
            .header("Authorization", &owner)
            .json(&serde_json::json!({"deviceId": id}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens.insert(id.clone(), device_token(&id, &primary_key(&device)));
    }
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let send = {
        let http = http.clone();
        let owner = owner.clone();
        let ledger = ledger.clone();
        let base = base.clone();
        move |device: String, message_id: String| {
            let http = http.clone();
            let owner = owner.clone();
            let ledger = ledger.clone();
            let url = format!(
                "{}/devices/{device}/commands?api-version=2021-04-12",
                base.lock().unwrap()
            );
            async move {
                let response = http
                    .post(url)
                    .header("Authorization", owner)
                    .header("iothub-ack", "full")
                    .header("iothub-messageid", &message_id)
                    .body(message_id.clone())
                    .send()
                    .await;
                if matches!(&response, Ok(r) if r.status() == 201) {
                    ledger.lock().unwrap().enqueued.insert(message_id);
                }
            }
        }
    };
    for d in 0..DEVICES {
        for i in 0..INITIAL {
            send(format!("dev-{d}"), format!("dev-{d}-{i}")).await;
        }
    }
    assert_eq!(ledger.lock().unwrap().enqueued.len(), DEVICES * INITIAL);

    // Receivers: two per device, each receiving, holding the message a moment, completing.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        for _ in 0..2 {
            let device = format!("dev-{d}");
            let token = tokens[&device].clone();
            let http = http.clone();
            let base = base.clone();
            let ledger = ledger.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let root = base.lock().unwrap().clone();
                    let received = http
                        .get(format!("{root}/devices/{device}/messages/deviceBound?api-version=2021-04-12&wait-ms=500"))
                        .header("Authorization", &token)
                        .send()
                        .await;
                    let Ok(response) = received else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    if response.status() != 200 {
                        continue;
                    }
                    let lock = response.headers()["etag"].to_str().unwrap().trim_matches('"').to_string();
                    let seq: i64 = response.headers()["iothub-sequencenumber"].to_str().unwrap().parse().unwrap();
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    let done = http
                        .delete(format!("{root}/devices/{device}/messages/deviceBound/{lock}?api-version=2021-04-12"))
                        .header("Authorization", &token)
                        .send()
                        .await;
                    if matches!(&done, Ok(r) if r.status() == 204) {
                        ledger.lock().unwrap().completed.insert((device.clone(), seq));
                    }
                }
            }));
        }
    }
    // The service keeps sending while the hub dies.
    let sender = {
        let send = send.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = INITIAL;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < INITIAL + 20 {
                for d in 0..DEVICES {
                    send(format!("dev-{d}"), format!("dev-{d}-{i}")).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    // Killed and started again three times while devices receive.
    let mut hub = first;
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if round == 0 {
            let completed_before = ledger.lock().unwrap().completed.len();
            assert!(
                completed_before > 0,
                "receivers were working when the hub was killed"
            );
        }
        hub.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        hub = HubProcess::start(&url, &data_dir).await;
        *base.lock().unwrap() = hub.base.clone();
    }
    let second = hub;

    // Everything ends: completed by the receivers, including what was locked at the kill (after its lock).
    let start = Instant::now();
    loop {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM c2d_messages WHERE state IN ('enqueued', 'invisible')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if live == 0 && sender.is_finished() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{live} messages never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let rows: Vec<(String, i64, String, String)> =
        sqlx::query_as("SELECT device_id, seq, message_id, state FROM c2d_messages")
            .fetch_all(&pool)
            .await
            .unwrap();
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let stored: BTreeSet<String> = rows.iter().map(|r| r.2.clone()).collect();
    for id in &ledger.enqueued {
        assert!(stored.contains(id), "acknowledged message {id} was lost");
    }
    let states: HashMap<(String, i64), String> = rows
        .iter()
        .map(|r| ((r.0.clone(), r.1), r.3.clone()))
        .collect();
    for key in &ledger.completed {
        assert_eq!(
            states[key], "completed",
            "acknowledged completion of {key:?} did not stand"
        );
    }
    assert!(rows
        .iter()
        .all(|r| r.3 == "completed" || r.3 == "dead_lettered"));

    // One feedback record per message (ack full), none lost with the process.
    let service =
        iothub::auth::sas::sign(HOST, &key("service").await, Some("service"), now() + 3600)
            .unwrap();
    let mut feedback = BTreeSet::new();
    loop {
        let response = http
            .get(format!(
                "{}/messages/serviceBound/feedback?api-version=2021-04-12",
                second.base
            ))
            .header("Authorization", &service)
            .send()
            .await
            .unwrap();
        if response.status() == 204 {
            break;
        }
        let lock = response.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_string();
        for record in response.json::<Vec<Value>>().await.unwrap() {
            assert!(
                feedback.insert(record["originalMessageId"].as_str().unwrap().to_string()),
                "duplicate feedback"
            );
        }
        let done = http
            .delete(format!(
                "{}/messages/serviceBound/feedback/{lock}?api-version=2021-04-12",
                second.base
            ))
            .header("Authorization", &service)
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 204);
    }
    assert_eq!(feedback, stored, "a feedback record for every message");
    drop(ledger);
    second.kill().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
