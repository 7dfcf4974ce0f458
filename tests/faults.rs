//! Faults: PostgreSQL restarted (fast shutdown) under load. The hub reports not-ready and answers 503 instead of
//! hanging while the database is down, recovers by itself, and every message it acknowledged is there afterwards.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iothub::auth::{policies, sas};
use iothub::postgres::{self, ManagedCluster};
use iothub::{Config, Listeners};
use serde_json::{json, Value};

mod common;

const HOST: &str = "faults.example.net";
const API: &str = "api-version=2021-04-12";

/// Every telemetry body in the stream (bodies are the senders' counters), partition by partition.
async fn stored_counters(http: &reqwest::Client, base: &str, token: &str) -> Vec<u32> {
    let mut stored = Vec::new();
    for p in 0..4 {
        let mut from = 0;
        loop {
            let page: Value = http
                .get(format!("{base}/messages/events/partitions/{p}?{API}&from-sequence-number={from}&max-count=1000"))
                .header("Authorization", token)
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
            for event in events {
                let body = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    event["body"].as_str().unwrap(),
                )
                .unwrap();
                stored.push(String::from_utf8(body).unwrap().parse().unwrap());
            }
            from = page["nextSequenceNumber"].as_i64().unwrap();
        }
    }
    stored
}

/// Every acknowledged counter is stored, and a sequential sender's order holds (a retry may repeat one in place).
fn account(acked: &[u32], stored: &[u32]) -> usize {
    let stored_set: BTreeSet<u32> = stored.iter().copied().collect();
    for n in acked {
        assert!(stored_set.contains(n), "acknowledged message {n} was lost");
    }
    let mut highest: Option<u32> = None;
    for n in stored {
        if let Some(h) = highest {
            assert!(*n >= h, "message {n} after {h}: order broken");
        }
        highest = Some(highest.map_or(*n, |h| h.max(*n)));
    }
    stored.len() - stored_set.len()
}

/// Waits until the command with each sequence number has completed; returns those that did not in time.
async fn wait_completed(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    device: &str,
    seqs: &[i64],
) -> BTreeSet<i64> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut open: BTreeSet<i64> = seqs.iter().copied().collect();
    while !open.is_empty() && Instant::now() < deadline {
        let mut still = BTreeSet::new();
        for seq in &open {
            let status: Value = http
                .get(format!("{base}/devices/{device}/commands/{seq}?{API}"))
                .header("Authorization", token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if status["state"] != "Completed" {
                still.insert(*seq);
            }
        }
        open = still;
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    open
}

async fn status(http: &reqwest::Client, url: &str) -> u16 {
    match http.get(url).timeout(Duration::from_secs(5)).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// A device and a back-end driving traffic through one or more hubs (a failed request is retried on the next
/// hub), and the ledger of what the hubs acknowledged.
struct Traffic {
    d2c_acked: Arc<Mutex<Vec<u32>>>,
    c2d_acked: Arc<Mutex<Vec<i64>>>,
    done: Arc<AtomicBool>,
    sender: tokio::task::JoinHandle<()>,
    enqueuer: tokio::task::JoinHandle<()>,
    receiver: tokio::task::JoinHandle<()>,
}

struct Ends {
    http: reqwest::Client,
    bases: Vec<String>,
    device: String,
    device_token: String,
    owner: String,
}

impl Traffic {
    /// `d2c` telemetry messages (bodies are counters, sent in order) and `c2d` commands (ack full), which the device
    /// receives and completes.
    fn start(ends: &Ends, d2c: u32, c2d: u32) -> Traffic {
        let d2c_acked: Arc<Mutex<Vec<u32>>> = Arc::default();
        let c2d_acked: Arc<Mutex<Vec<i64>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let sender = {
            let (http, bases, device, token, acked) = (
                ends.http.clone(),
                ends.bases.clone(),
                ends.device.clone(),
                ends.device_token.clone(),
                d2c_acked.clone(),
            );
            tokio::spawn(async move {
                for n in 0..d2c {
                    let mut attempt = n as usize;
                    loop {
                        let base = &bases[attempt % bases.len()];
                        let sent = http
                            .post(format!("{base}/devices/{device}/messages/events?{API}"))
                            .header("Authorization", &token)
                            .timeout(Duration::from_secs(10))
                            .body(format!("{n}"))
                            .send()
                            .await;
                        if sent.is_ok_and(|r| r.status() == 204) {
                            acked.lock().unwrap().push(n);
                            break;
                        }
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let enqueuer = {
            let (http, bases, device, token, acked) = (
                ends.http.clone(),
                ends.bases.clone(),
                ends.device.clone(),
                ends.owner.clone(),
                c2d_acked.clone(),
            );
            tokio::spawn(async move {
                for n in 0..c2d {
                    let mut attempt = n as usize;
                    loop {
                        let base = &bases[attempt % bases.len()];
                        let sent = http
                            .post(format!("{base}/devices/{device}/commands?{API}"))
                            .header("Authorization", &token)
                            .header("iothub-messageid", format!("c{n}"))
                            .header("iothub-ack", "full")
                            .timeout(Duration::from_secs(10))
                            .body(format!("{n}"))
                            .send()
                            .await;
                        if let Ok(r) = sent {
                            if r.status() == 201 {
                                let body: Value = r.json().await.unwrap();
                                acked
                                    .lock()
                                    .unwrap()
                                    .push(body["sequenceNumber"].as_i64().unwrap());
                                break;
                            }
                        }
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        };
        let receiver = {
            let (http, bases, device, token, done) = (
                ends.http.clone(),
                ends.bases.clone(),
                ends.device.clone(),
                ends.device_token.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                let mut attempt = 0usize;
                while !done.load(Ordering::Relaxed) {
                    attempt += 1;
                    let base = &bases[attempt % bases.len()];
                    let got = http
                        .get(format!(
                            "{base}/devices/{device}/messages/deviceBound?{API}&wait-ms=500"
                        ))
                        .header("Authorization", &token)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    let Ok(got) = got.map_err(|_| ()).and_then(|r| {
                        if r.status() == 200 {
                            Ok(r)
                        } else {
                            Err(())
                        }
                    }) else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let lock = got.headers()["etag"]
                        .to_str()
                        .unwrap()
                        .trim_matches('"')
                        .to_string();
                    let _ = http
                        .delete(format!(
                            "{base}/devices/{device}/messages/deviceBound/{lock}?{API}"
                        ))
                        .header("Authorization", &token)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                }
            })
        };
        Traffic {
            d2c_acked,
            c2d_acked,
            done,
            sender,
            enqueuer,
            receiver,
        }
    }

    fn telemetry_acknowledged(&self) -> usize {
        self.d2c_acked.lock().unwrap().len()
    }

    /// Waits for the senders, then for every acknowledged command to complete, and accounts for every message
    /// through `reader` (a live hub). Returns a line of figures.
    async fn account(self, ends: &Ends, reader: &str, d2c: u32, c2d: u32) -> String {
        tokio::time::timeout(Duration::from_secs(120), self.sender)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(120), self.enqueuer)
            .await
            .unwrap()
            .unwrap();
        let commands: Vec<i64> = self.c2d_acked.lock().unwrap().clone();
        let open = wait_completed(&ends.http, reader, &ends.owner, &ends.device, &commands).await;
        self.done.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(15), self.receiver).await;
        assert!(
            open.is_empty(),
            "acknowledged commands never completed: {open:?}"
        );
        assert_eq!(commands.len(), c2d as usize);

        // Each acknowledged command's Success feedback (ack full) reaches the service.
        let wanted: BTreeSet<String> = (0..c2d).map(|n| format!("c{n}")).collect();
        let heard = drain_feedback(&ends.http, reader, &ends.owner, &wanted).await;
        let missing: Vec<&String> = wanted.difference(&heard).collect();
        assert!(missing.is_empty(), "no Success feedback for {missing:?}");

        let stored = stored_counters(&ends.http, reader, &ends.owner).await;
        let acked: Vec<u32> = self.d2c_acked.lock().unwrap().clone();
        assert_eq!(acked.len(), d2c as usize);
        let duplicates = account(&acked, &stored);
        format!(
            "{} telemetry acknowledged, {} stored ({duplicates} duplicates from retries), 0 lost; \
             {} commands acknowledged and completed, {} with their Success feedback",
            acked.len(),
            stored.len(),
            commands.len(),
            heard.len()
        )
    }
}

/// Receives and completes feedback batches until every message id in `wanted` has a Success record (or a minute
/// has passed); returns the ids heard.
async fn drain_feedback(
    http: &reqwest::Client,
    base: &str,
    owner: &str,
    wanted: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut heard = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !wanted.is_subset(&heard) && Instant::now() < deadline {
        let response = http
            .get(format!(
                "{base}/messages/serviceBound/feedback?{API}&wait-ms=1000"
            ))
            .header("Authorization", owner)
            .send()
            .await
            .unwrap();
        if response.status() != 200 {
            continue;
        }
        let lock = response.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_string();
        let records: Vec<Value> = response.json().await.unwrap();
        for record in records {
            if record["statusCode"] == "Success" {
                heard.insert(record["originalMessageId"].as_str().unwrap().to_string());
            }
        }
        http.delete(format!(
            "{base}/messages/serviceBound/feedback/{lock}?{API}"
        ))
        .header("Authorization", owner)
        .send()
        .await
        .unwrap();
    }
    heard
}

async fn device_credentials(
    ends_http: &reqwest::Client,
    base: &str,
    owner: &str,
    host: &str,
    id: &str,
) -> String {
    let device: Value = ends_http
        .put(format!("{base}/devices/{id}?{API}"))
        .header("Authorization", owner)
        .json(&json!({"deviceId": id}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    sas::sign(
        &format!("{host}/devices/{id}"),
        key,
        None,
        chrono::Utc::now().timestamp() + 3600,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_load_loses_no_acknowledged_message() {
    // A cluster of its own, so restarting it disturbs no other test.
    let root =
        std::env::temp_dir().join(format!("iothub-faults-{}", uuid::Uuid::new_v4().simple()));
    let cluster = ManagedCluster::start(&root).await.unwrap();
    let pool = postgres::connect(cluster.hub_options(), 8).await.unwrap();
    let mut config = Config::with_database("postgres://unused");
    config.hostname = HOST.into();
    let listeners = Listeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls: None,
        metrics: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = iothub::launch(config, pool.clone(), listeners, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let base = format!("http://{}", hub.http_addr);
    let http = reqwest::Client::new();
    let owner_key = policies::get(&pool, "iothubowner")
        .await
        .unwrap()
        .unwrap()
        .primary_key;
    let owner = sas::sign(
        HOST,
        &owner_key,
        Some("iothubowner"),
        chrono::Utc::now().timestamp() + 3600,
    )
    .unwrap();
    let device_token = device_credentials(&http, &base, &owner, HOST, "f1").await;
    let ends = Ends {
        http: http.clone(),
        bases: vec![base.clone()],
        device: "f1".into(),
        device_token,
        owner: owner.clone(),
    };
    let traffic = Traffic::start(&ends, 400, 60);

    // Stop PostgreSQL (fast shutdown) in the middle of the traffic — twice.
    let ready = format!("{base}/health/ready");
    let mut cluster = cluster;
    for acks_before in [100, 250] {
        while traffic.telemetry_acknowledged() < acks_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.stop().await.unwrap();
        let down_since = Instant::now();
        let mut saw_not_ready = false;
        while down_since.elapsed() < Duration::from_secs(10) {
            let asked = Instant::now();
            let status = status(&http, &ready).await;
            assert!(
                asked.elapsed() < Duration::from_secs(4),
                "readiness must answer, not hang"
            );
            if status == 503 {
                saw_not_ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            saw_not_ready,
            "the hub reports not-ready while its database is down"
        );
        let asked = Instant::now();
        let response = http
            .get(format!("{base}/devices/f1?{API}"))
            .header("Authorization", &owner)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "a request answers 503 instead of hanging"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;

        cluster = ManagedCluster::start(&root).await.unwrap();
        let back = Instant::now();
        while status(&http, &ready).await != 200 {
            assert!(
                back.elapsed() < Duration::from_secs(30),
                "the hub recovers by itself"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let figures = traffic.account(&ends, &base, 400, 60).await;
    eprintln!("PostgreSQL restarted twice: {figures}");

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(40), hub.wait()).await;
    pool.close().await;
    cluster.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_two_hub_processes_killed_under_load_loses_nothing() {
    let db = common::TestDb::create().await;
    let url = db.url();
    let dir =
        std::env::temp_dir().join(format!("iothub-two-hubs-{}", uuid::Uuid::new_v4().simple()));
    let doomed = common::HubProcess::start(&url, &dir).await;
    let survivor = common::HubProcess::start(&url, &dir).await;
    let pool = db.pool().await;
    let owner_key = policies::get(&pool, "iothubowner")
        .await
        .unwrap()
        .unwrap()
        .primary_key;
    let owner = sas::sign(
        common::HOST,
        &owner_key,
        Some("iothubowner"),
        chrono::Utc::now().timestamp() + 3600,
    )
    .unwrap();
    let http = reqwest::Client::new();
    let device_token = device_credentials(&http, &doomed.base, &owner, common::HOST, "two").await;
    let survivor_base = survivor.base.clone();
    let ends = Ends {
        http,
        bases: vec![doomed.base.clone(), survivor.base.clone()],
        device: "two".into(),
        device_token,
        owner,
    };
    let traffic = Traffic::start(&ends, 300, 40);
    while traffic.telemetry_acknowledged() < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill().await;
    let figures = traffic.account(&ends, &survivor_base, 300, 40).await;
    eprintln!("two hubs, one killed: {figures}");
    survivor.kill().await;
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
}
