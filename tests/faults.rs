//! Faults: PostgreSQL restarted (fast shutdown) under load, and one of two hub processes SIGKILLed under load.
//! The hub reports not-ready and answers 503 instead of hanging while the database is down, recovers by itself,
//! and every message it acknowledged is there afterwards: a ledger of what the hubs answered is checked, entry by
//! entry, against what is stored — so a loss and a duplicate both fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iothub::auth::{policies, sas};
use iothub::postgres::{self, ManagedCluster};
use iothub::{Config, Listeners};
use serde_json::{json, Value};
use sqlx::PgPool;

mod common;

const HOST: &str = "faults.example.net";
const API: &str = "api-version=2021-04-12";

/// Every telemetry body in the stream (bodies are the senders' counters), partition by partition, checking that
/// each partition's sequence numbers run from 0 without a gap and its enqueued times never decrease.
async fn stored_counters(http: &reqwest::Client, base: &str, token: &str) -> Vec<u32> {
    let mut stored = Vec::new();
    for p in 0..4 {
        let mut from = 0;
        let mut last_time = String::new();
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
                assert_eq!(
                    event["sequenceNumber"].as_i64(),
                    Some(from),
                    "sequence numbers of partition {p} run without a gap"
                );
                from += 1;
                // RFC 3339 UTC with milliseconds: text order is time order.
                let time = event["enqueuedTimeUtc"].as_str().unwrap().to_string();
                assert!(time >= last_time, "partition {p}: enqueued time went back");
                last_time = time;
                let body = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    event["body"].as_str().unwrap(),
                )
                .unwrap();
                stored.push(String::from_utf8(body).unwrap().parse().unwrap());
            }
        }
    }
    stored
}

/// Telemetry accounted by identity: every acknowledged counter is stored; a counter is stored more than once only
/// when the sender retried it after an attempt whose answer it never got (the hub may have committed it), and at
/// most once per such attempt; nothing is stored that was never sent; a sequential sender's order holds (a retry
/// may repeat one in place). Returns the number of extra copies.
fn account_telemetry(acked: &[u32], unanswered: &BTreeMap<u32, usize>, stored: &[u32]) -> usize {
    let mut copies: BTreeMap<u32, usize> = BTreeMap::new();
    for n in stored {
        *copies.entry(*n).or_default() += 1;
    }
    for n in acked {
        assert!(copies.contains_key(n), "acknowledged message {n} was lost");
    }
    let acked_set: BTreeSet<u32> = acked.iter().copied().collect();
    for (n, count) in &copies {
        assert!(acked_set.contains(n), "message {n} stored but never sent");
        let allowed = 1 + unanswered.get(n).copied().unwrap_or(0);
        assert!(
            *count <= allowed,
            "message {n} stored {count} times, but only {} of its attempts went unanswered",
            allowed - 1
        );
    }
    let mut highest: Option<u32> = None;
    for n in stored {
        if let Some(h) = highest {
            assert!(*n >= h, "message {n} after {h}: order broken");
        }
        highest = Some(highest.map_or(*n, |h| h.max(*n)));
    }
    stored.len() - copies.len()
}

/// Waits until the command with each sequence number reads Completed through the API; returns those that did not
/// in time.
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

/// What the hubs answered, as the clients saw it.
#[derive(Default)]
struct Ledger {
    /// Telemetry counters answered 204, in sending order.
    d2c_acked: Vec<u32>,
    /// Per counter, attempts that reached a hub but got no answer or a 503 (the hub may have committed them).
    d2c_unanswered: BTreeMap<u32, usize>,
    /// Sequence numbers of commands answered 201, in enqueuing order.
    c2d_acked: Vec<i64>,
    /// Per command message id, enqueue attempts that reached a hub but got no answer or a 503.
    c2d_unanswered: BTreeMap<String, usize>,
    /// Completions answered 204: (device, sequence number), once per answer.
    completed: Vec<(String, i64)>,
    /// Completions that reached a hub but got no answer or a 503 (the hub died or its database went down).
    completion_unanswered: BTreeSet<(String, i64)>,
}

/// An answer a fault may legitimately produce instead of the normal one: no answer at all, or 503.
fn fault_answer(sent: &Result<reqwest::Response, reqwest::Error>) -> bool {
    match sent {
        Err(_) => true,
        Ok(r) => r.status() == 503,
    }
}

/// Whether the hub may have committed a request that did not get its normal answer: it reached the hub (a refused
/// connection never did) and the answer was lost or was a 503 (a commit whose confirmation the database lost).
fn maybe_committed(sent: &Result<reqwest::Response, reqwest::Error>) -> bool {
    match sent {
        Err(e) => !e.is_connect(),
        Ok(r) => r.status() == 503,
    }
}

/// A device and a back-end driving traffic through one or more hubs (a failed request is retried on the next
/// hub), and the ledger of what the hubs acknowledged.
struct Traffic {
    ledger: Arc<Mutex<Ledger>>,
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
    /// The database, to account for every command row and feedback record.
    db: PgPool,
}

impl Traffic {
    /// `d2c` telemetry messages (bodies are counters, sent in order) and `c2d` commands (ack full), which the device
    /// receives and completes.
    fn start(ends: &Ends, d2c: u32, c2d: u32) -> Traffic {
        let ledger: Arc<Mutex<Ledger>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let sender = {
            let (http, bases, device, token, ledger) = (
                ends.http.clone(),
                ends.bases.clone(),
                ends.device.clone(),
                ends.device_token.clone(),
                ledger.clone(),
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
                        if matches!(&sent, Ok(r) if r.status() == 204) {
                            ledger.lock().unwrap().d2c_acked.push(n);
                            break;
                        }
                        assert!(fault_answer(&sent), "telemetry {n}: {sent:?}");
                        if maybe_committed(&sent) {
                            *ledger.lock().unwrap().d2c_unanswered.entry(n).or_default() += 1;
                        }
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    // Pacing, so the traffic spans the faults.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let enqueuer = {
            let (http, bases, device, token, ledger) = (
                ends.http.clone(),
                ends.bases.clone(),
                ends.device.clone(),
                ends.owner.clone(),
                ledger.clone(),
            );
            tokio::spawn(async move {
                for n in 0..c2d {
                    let id = format!("c{n}");
                    let mut attempt = n as usize;
                    loop {
                        let base = &bases[attempt % bases.len()];
                        let sent = http
                            .post(format!("{base}/devices/{device}/commands?{API}"))
                            .header("Authorization", &token)
                            .header("iothub-messageid", &id)
                            .header("iothub-ack", "full")
                            .timeout(Duration::from_secs(10))
                            .body(format!("{n}"))
                            .send()
                            .await;
                        if let Ok(r) = &sent {
                            if r.status() == 201 {
                                let body: Value = sent.unwrap().json().await.unwrap();
                                let seq = body["sequenceNumber"].as_i64().unwrap();
                                ledger.lock().unwrap().c2d_acked.push(seq);
                                break;
                            }
                            // The queue is full while the receiver cannot complete: a refusal, nothing stored.
                            if r.status() == 403 {
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        }
                        assert!(fault_answer(&sent), "command {id}: {sent:?}");
                        if maybe_committed(&sent) {
                            *ledger
                                .lock()
                                .unwrap()
                                .c2d_unanswered
                                .entry(id.clone())
                                .or_default() += 1;
                        }
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        };
        let receiver = {
            let (http, bases, device, token, done, ledger) = (
                ends.http.clone(),
                ends.bases.clone(),
                ends.device.clone(),
                ends.device_token.clone(),
                done.clone(),
                ledger.clone(),
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
                    match &got {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) if r.status() == 204 => continue,
                        _ => {
                            assert!(fault_answer(&got), "receive: {got:?}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                    let got = got.unwrap();
                    let header = |name: &str| got.headers()[name].to_str().unwrap().to_string();
                    let lock = header("etag").trim_matches('"').to_string();
                    let seq: i64 = header("iothub-sequencenumber").parse().unwrap();
                    let completion = http
                        .delete(format!(
                            "{base}/devices/{device}/messages/deviceBound/{lock}?{API}"
                        ))
                        .header("Authorization", &token)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    let key = (device.clone(), seq);
                    if matches!(&completion, Ok(r) if r.status() == 204) {
                        ledger.lock().unwrap().completed.push(key);
                    } else {
                        assert!(
                            fault_answer(&completion),
                            "completion of {seq}: {completion:?}"
                        );
                        if maybe_committed(&completion) {
                            ledger.lock().unwrap().completion_unanswered.insert(key);
                        }
                    }
                }
            })
        };
        Traffic {
            ledger,
            done,
            sender,
            enqueuer,
            receiver,
        }
    }

    fn telemetry_acknowledged(&self) -> usize {
        self.ledger.lock().unwrap().d2c_acked.len()
    }

    /// Waits for the senders, then for every command to complete, and accounts for every message through `reader`
    /// (a live hub) and the database. `extra_commands` were enqueued and completed outside this traffic, each with
    /// one acknowledged completion. Returns a line of figures.
    async fn account(
        self,
        ends: &Ends,
        reader: &str,
        d2c: u32,
        c2d: u32,
        extra_commands: &[(String, i64, String)],
    ) -> String {
        // A panic in any client task fails the test here.
        for (name, task) in [("sender", self.sender), ("enqueuer", self.enqueuer)] {
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .unwrap_or_else(|_| panic!("the {name} finishes"))
                .unwrap_or_else(|e| panic!("the {name} failed: {e}"));
        }
        let commands: Vec<i64> = self.ledger.lock().unwrap().c2d_acked.clone();
        assert_eq!(commands.len(), c2d as usize);
        let open = wait_completed(&ends.http, reader, &ends.owner, &ends.device, &commands).await;
        assert!(
            open.is_empty(),
            "acknowledged commands never completed: {open:?}"
        );
        // A command stored by an attempt whose answer was lost is no less a command: the receiver completes it too.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM c2d_messages WHERE state IN ('enqueued', 'invisible')",
            )
            .fetch_one(&ends.db)
            .await
            .unwrap();
            if live == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{live} commands never ended");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.done.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(15), self.receiver)
            .await
            .expect("the receiver stops")
            .unwrap_or_else(|e| panic!("the receiver failed: {e}"));
        let ledger = std::mem::take(&mut *self.ledger.lock().unwrap());

        // Commands: every row completed; one row per message id unless an enqueue attempt of it went unanswered;
        // every completion answered 204 once at most, and no row completed that nobody asked to complete.
        let rows: Vec<(String, i64, String, String)> =
            sqlx::query_as("SELECT device_id, seq, message_id, state FROM c2d_messages")
                .fetch_all(&ends.db)
                .await
                .unwrap();
        let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
        for (device, seq, id, state) in &rows {
            assert_eq!(state, "completed", "command {device}/{seq} ({id})");
            *per_id.entry(id.clone()).or_default() += 1;
        }
        for (id, count) in &per_id {
            let allowed = 1 + ledger.c2d_unanswered.get(id).copied().unwrap_or(0);
            assert!(
                *count <= allowed,
                "command {id} stored {count} times, allowed {allowed}"
            );
        }
        let mut completions: BTreeMap<(String, i64), usize> = BTreeMap::new();
        for key in ledger
            .completed
            .iter()
            .cloned()
            .chain(extra_commands.iter().map(|(d, s, _)| (d.clone(), *s)))
        {
            *completions.entry(key).or_default() += 1;
        }
        for (key, answers) in &completions {
            assert_eq!(
                *answers, 1,
                "completion of {key:?} acknowledged {answers} times"
            );
        }
        for (device, seq, id, _) in &rows {
            let key = (device.clone(), *seq);
            assert!(
                completions.contains_key(&key) || ledger.completion_unanswered.contains(&key),
                "command {id} completed though no completion of it was sent"
            );
        }

        // Feedback: exactly one Success record per stored command (ack full), every record accounted for.
        let records = drain_feedback(&ends.http, reader, &ends.owner, rows.len()).await;
        let mut heard: BTreeMap<String, usize> = BTreeMap::new();
        for (id, status) in &records {
            assert_eq!(status, "Success", "feedback for {id}");
            *heard.entry(id.clone()).or_default() += 1;
        }
        assert_eq!(heard, per_id, "one Success record per stored command");
        for (_, _, id) in extra_commands {
            assert_eq!(heard.get(id), Some(&1), "feedback for {id}");
        }

        let stored = stored_counters(&ends.http, reader, &ends.owner).await;
        assert_eq!(ledger.d2c_acked.len(), d2c as usize);
        let duplicates = account_telemetry(&ledger.d2c_acked, &ledger.d2c_unanswered, &stored);
        let retried: usize = ledger.d2c_unanswered.values().sum();
        format!(
            "{} telemetry acknowledged, {} stored ({duplicates} extra copies, {retried} attempts that may have \
             committed retried), 0 lost, sequence numbers gap-free; {} commands acknowledged ({} rows), {} completions \
             acknowledged once each ({} unanswered), {} feedback records, one Success per command",
            ledger.d2c_acked.len(),
            stored.len(),
            commands.len(),
            rows.len(),
            completions.len(),
            ledger.completion_unanswered.len(),
            records.len()
        )
    }
}

/// Receives and completes feedback batches until `expected` records were received (or a minute has passed), then
/// checks that nothing more is pending; returns every record as (original message id, status code).
async fn drain_feedback(
    http: &reqwest::Client,
    base: &str,
    owner: &str,
    expected: usize,
) -> Vec<(String, String)> {
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while records.len() < expected {
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} feedback records arrived",
            records.len()
        );
        let response = http
            .get(format!(
                "{base}/messages/serviceBound/feedback?{API}&wait-ms=1000"
            ))
            .header("Authorization", owner)
            .send()
            .await
            .unwrap();
        if response.status() == 204 {
            continue;
        }
        assert_eq!(response.status(), 200, "receive feedback");
        let lock = response.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_string();
        let batch: Vec<Value> = response.json().await.unwrap();
        for record in batch {
            records.push((
                record["originalMessageId"].as_str().unwrap().to_string(),
                record["statusCode"].as_str().unwrap().to_string(),
            ));
        }
        let done = http
            .delete(format!(
                "{base}/messages/serviceBound/feedback/{lock}?{API}"
            ))
            .header("Authorization", owner)
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 204, "complete a feedback batch");
    }
    let more = http
        .get(format!(
            "{base}/messages/serviceBound/feedback?{API}&wait-ms=1000"
        ))
        .header("Authorization", owner)
        .send()
        .await
        .unwrap();
    assert_eq!(
        more.status(),
        204,
        "no feedback beyond one record per command"
    );
    records
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
        mqtts: None,
        mqtt: None,
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
        db: pool.clone(),
    };
    let traffic = Traffic::start(&ends, 400, 60);

    // Stop PostgreSQL (fast shutdown) in the middle of the traffic — twice.
    let ready = format!("{base}/health/ready");
    let mut cluster = cluster;
    for acks_before in [100, 250] {
        common::wait_until("telemetry flows", || async {
            traffic.telemetry_acknowledged() >= acks_before
        })
        .await;
        cluster.stop().await.unwrap();
        // Readiness answers (each probe is bounded by its own 5 s client timeout) and turns 503.
        let down_since = Instant::now();
        while status(&http, &ready).await != 503 {
            assert!(
                down_since.elapsed() < Duration::from_secs(10),
                "the hub reports not-ready while its database is down"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A request answers 503; the client's generous timeout is the "does not hang" bound.
        let response = http
            .get(format!("{base}/devices/f1?{API}"))
            .header("Authorization", &owner)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .expect("an answer instead of a hang");
        assert_eq!(response.status(), 503);
        // The outage lasts a moment longer, so that traffic keeps hitting it.
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
    let figures = traffic.account(&ends, &base, 400, 60, &[]).await;
    eprintln!("PostgreSQL restarted twice: {figures}");

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(40), hub.wait()).await;
    pool.close().await;
    cluster.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(root);
}

/// Enqueues a command (ack full) for `device` through `base`; returns its sequence number.
async fn enqueue(http: &reqwest::Client, base: &str, owner: &str, device: &str, id: &str) -> i64 {
    let response = http
        .post(format!("{base}/devices/{device}/commands?{API}"))
        .header("Authorization", owner)
        .header("iothub-messageid", id)
        .header("iothub-ack", "full")
        .body("held")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["sequenceNumber"]
        .as_i64()
        .unwrap()
}

/// Receives one command for the device through `base`, waiting up to `wait_ms`; (lock token, message id,
/// delivery count) or None.
async fn receive_one(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    device: &str,
    wait_ms: u64,
) -> Option<(String, String, String)> {
    let response = http
        .get(format!(
            "{base}/devices/{device}/messages/deviceBound?{API}&wait-ms={wait_ms}"
        ))
        .header("Authorization", token)
        .send()
        .await
        .unwrap();
    if response.status() == 204 {
        return None;
    }
    assert_eq!(response.status(), 200);
    let header = |name: &str| response.headers()[name].to_str().unwrap().to_string();
    Some((
        header("etag").trim_matches('"').to_string(),
        header("iothub-messageid"),
        header("iothub-deliverycount"),
    ))
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
    // A second device whose one command is held, locked through the process that is killed.
    let held_token = device_credentials(&http, &doomed.base, &owner, common::HOST, "held").await;
    let survivor_base = survivor.base.clone();
    let ends = Ends {
        http: http.clone(),
        bases: vec![doomed.base.clone(), survivor.base.clone()],
        device: "two".into(),
        device_token,
        owner: owner.clone(),
        db: pool.clone(),
    };
    let traffic = Traffic::start(&ends, 300, 40);
    let held_seq = enqueue(&http, &survivor_base, &owner, "held", "held-1").await;
    common::wait_until("telemetry flows", || async {
        traffic.telemetry_acknowledged() >= 100
    })
    .await;
    let (held_lock, held_id, held_count) = receive_one(&http, &doomed.base, &held_token, "held", 0)
        .await
        .expect("the held command is delivered through the doomed process");
    assert_eq!((held_id.as_str(), held_count.as_str()), ("held-1", "0"));
    doomed.kill().await;

    // The held command is locked: invisible through the survivor until its lock (5 s) runs out, then it comes back
    // with that delivery counted, and completes through the survivor.
    assert!(
        receive_one(&http, &survivor_base, &held_token, "held", 0)
            .await
            .is_none(),
        "a command locked through the killed process stays locked"
    );
    let (lock, id, count) = receive_one(&http, &survivor_base, &held_token, "held", 20_000)
        .await
        .expect("the held command comes back after its lock");
    assert_eq!((id.as_str(), count.as_str()), ("held-1", "1"));
    assert_ne!(lock, held_lock, "a new lease");
    let done = http
        .delete(format!(
            "{survivor_base}/devices/held/messages/deviceBound/{lock}?{API}"
        ))
        .header("Authorization", &held_token)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 204);

    let extra = [("held".to_string(), held_seq, "held-1".to_string())];
    let figures = traffic
        .account(&ends, &survivor_base, 300, 40, &extra)
        .await;
    eprintln!("two hubs, one killed: {figures}");
    survivor.kill().await;
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
}
