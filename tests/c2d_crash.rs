//! A hub process killed with SIGKILL while devices receive and the service sends loses no acknowledged message:
//! after a restart every enqueued message is completed or dead-lettered, with its feedback, and every completion
//! the hub acknowledged stands, once, and no message is ever held by two receivers at once.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DEVICES: usize = 4;
const INITIAL: usize = 30;

/// How long a received C2D message stays locked (`HubProcess` sets `IOTHUB_C2D_LOCK_SECS=5`).
const LOCK: Duration = Duration::from_secs(5);

/// One receiver's hold on a message, as the receiver saw it.
#[derive(Clone, Debug)]
struct Lease {
    message_id: String,
    lock: String,
    holder: String,
    /// Surely held from: the receive's answer arrived.
    from: Instant,
    /// Surely released by: the completion's answer arrived, or the lock ran out (counted from when the receive was
    /// sent, before the hub could lock), whichever is first.
    until: Instant,
}

#[derive(Default)]
struct Ledger {
    /// Message ids the hub answered 201 for.
    enqueued: BTreeSet<String>,
    /// (device, sequence number) of completions the hub answered 204 for, once per answer.
    completed: Vec<(String, i64)>,
    /// Completions that got no answer (the hub died under them).
    unanswered: BTreeSet<(String, i64)>,
    /// Every lease a receiver held.
    leases: Vec<Lease>,
}

/// No message is held by two receivers at once: two leases of one message never overlap.
fn assert_no_overlapping_leases(leases: &[Lease]) {
    let mut by_message: HashMap<&str, Vec<&Lease>> = HashMap::new();
    for lease in leases {
        by_message.entry(&lease.message_id).or_default().push(lease);
    }
    for (id, mut leases) in by_message {
        leases.sort_by_key(|l| l.from);
        for pair in leases.windows(2) {
            assert!(
                pair[1].from >= pair[0].until,
                "message {id} held by {} and {} at once: {:?} and {:?}",
                pair[0].holder,
                pair[1].holder,
                pair[0],
                pair[1]
            );
            assert_ne!(
                pair[0].lock, pair[1].lock,
                "message {id}: a lock token reused"
            );
        }
    }
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
        for r in 0..2 {
            let device = format!("dev-{d}");
            let holder = format!("{device}/receiver-{r}");
            let token = tokens[&device].clone();
            let http = http.clone();
            let base = base.clone();
            let ledger = ledger.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let root = base.lock().unwrap().clone();
                    let sent = Instant::now();
                    let received = http
                        .get(format!("{root}/devices/{device}/messages/deviceBound?api-version=2021-04-12&wait-ms=500"))
                        .header("Authorization", &token)
                        .send()
                        .await;
                    // No answer: the hub is being killed or restarted.
                    let Ok(response) = received else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    if response.status() == 204 {
                        continue;
                    }
                    assert_eq!(response.status(), 200, "{holder}: receive");
                    let from = Instant::now();
                    let header = |name: &str| response.headers()[name].to_str().unwrap().to_string();
                    let lock = header("etag").trim_matches('"').to_string();
                    let seq: i64 = header("iothub-sequencenumber").parse().unwrap();
                    let message_id = header("iothub-messageid");
                    // Hold the message a moment, so that a second holder at the same time would overlap.
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    let done = http
                        .delete(format!("{root}/devices/{device}/messages/deviceBound/{lock}?api-version=2021-04-12"))
                        .header("Authorization", &token)
                        .send()
                        .await;
                    let until = Instant::now().min(sent + LOCK);
                    let acknowledged = match done {
                        Ok(r) if r.status() == 204 => true,
                        Ok(r) => panic!("{holder}: completion of {seq} answered {}", r.status()),
                        Err(_) => false,
                    };
                    let mut ledger = ledger.lock().unwrap();
                    ledger.leases.push(Lease { message_id, lock, holder: holder.clone(), from, until });
                    if acknowledged {
                        ledger.completed.push((device.clone(), seq));
                    } else {
                        ledger.unanswered.insert((device.clone(), seq));
                    }
                }
            }));
        }
    }
    // The service keeps sending while the hub dies, until the last restart.
    let sending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sender = {
        let send = send.clone();
        let sending = sending.clone();
        tokio::spawn(async move {
            let mut i = INITIAL;
            while sending.load(std::sync::atomic::Ordering::Relaxed) {
                for d in 0..DEVICES {
                    send(format!("dev-{d}"), format!("dev-{d}-{i}")).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    // Killed and started again three times while devices receive. Before each kill the test itself takes one
    // message through the doomed process and never completes it: it must come back after its lock, to a receiver.
    let mut hub = first;
    let mut held = Vec::new();
    for round in 0..3 {
        let completed_before = ledger.lock().unwrap().completed.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ledger.lock().unwrap().completed.len() < completed_before + 10 {
            assert!(
                Instant::now() < deadline,
                "receivers are working before kill {round}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let device = format!("dev-{round}");
        let sent = Instant::now();
        let response = http
            .get(url_of(&format!(
                "/devices/{device}/messages/deviceBound?wait-ms=8000"
            )))
            .header("Authorization", &tokens[&device])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "a message to hold for {device}");
        let lock = response.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_string();
        let message_id = response.headers()["iothub-messageid"]
            .to_str()
            .unwrap()
            .to_string();
        let seq: i64 = response.headers()["iothub-sequencenumber"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        ledger.lock().unwrap().leases.push(Lease {
            message_id: message_id.clone(),
            lock,
            holder: format!("held through the process killed in round {round}"),
            from: Instant::now(),
            until: sent + LOCK,
        });
        held.push(((device, seq), message_id));
        hub.kill().await;
        hub = HubProcess::start(&url, &data_dir).await;
        *base.lock().unwrap() = hub.base.clone();
    }
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
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
        // A receiver ends only when told to: one that ended early failed, and its panic is the test's.
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            tasks.swap_remove(i).await.unwrap();
            panic!("a receiver stopped early");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{live} messages never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // A panic in a receiver or the sender fails the test here.
    sender.await.unwrap();
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
    let mut answers: HashMap<&(String, i64), usize> = HashMap::new();
    for key in &ledger.completed {
        *answers.entry(key).or_default() += 1;
        assert_eq!(
            states[key], "completed",
            "acknowledged completion of {key:?} did not stand"
        );
    }
    for (key, n) in &answers {
        assert_eq!(*n, 1, "completion of {key:?} acknowledged {n} times");
    }
    // Nothing completed that no receiver asked to complete.
    for (key, state) in &states {
        if state == "completed" {
            assert!(
                answers.contains_key(key) || ledger.unanswered.contains(key),
                "{key:?} completed without a completion sent"
            );
        }
    }
    assert!(rows
        .iter()
        .all(|r| r.3 == "completed" || r.3 == "dead_lettered"));
    assert_no_overlapping_leases(&ledger.leases);
    // Each message held through a killed process came back after its lock and a receiver completed it.
    for (key, message_id) in &held {
        assert!(
            answers.contains_key(key),
            "{message_id}, locked through a killed process, was completed by a receiver afterwards"
        );
    }
    eprintln!(
        "{} enqueued, {} leases, {} completions acknowledged, {} unanswered, {} held through killed processes",
        ledger.enqueued.len(),
        ledger.leases.len(),
        ledger.completed.len(),
        ledger.unanswered.len(),
        held.len()
    );

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
    second.kill().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
