//! The stream under concurrency: many writers on two hub processes and readers per consumer group at the same
//! time; every acknowledged message is read exactly once per group, in order per device. And the Server-Sent
//! Events stream with `Last-Event-ID` resume.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const API: &str = "api-version=2021-04-12";

fn body_text(event: &Value) -> String {
    String::from_utf8(BASE64.decode(event["body"].as_str().unwrap()).unwrap()).unwrap()
}

/// Reads every partition through `group` with long polls and checkpoints until `expected` events were seen;
/// returns (device, body) in the order read per partition, and checks that sequence numbers never skip.
async fn read_group(
    http: reqwest::Client,
    base: String,
    token: String,
    group: String,
    expected: usize,
) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut next: BTreeMap<u32, i64> = (0..4).map(|p| (p, 0)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{group}: only {} of {expected} read",
            seen.len()
        );
        for p in 0..4u32 {
            let url = format!("{base}/messages/events/consumerGroups/{group}/partitions/{p}?{API}&wait-ms=50&max-count=1000");
            let page: Value = http
                .get(url)
                .header("Authorization", &token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let events = page["events"].as_array().unwrap();
            for event in events {
                let seq = event["sequenceNumber"].as_i64().unwrap();
                // No gap, no skip, no repeat: each read continues exactly after the checkpoint.
                assert_eq!(seq, next[&p], "{group}: partition {p}");
                next.insert(p, seq + 1);
                seen.push((
                    event["deviceId"].as_str().unwrap().to_string(),
                    body_text(event),
                ));
            }
            if let Some(last) = events.last() {
                let response = http
                    .put(format!("{base}/messages/events/consumerGroups/{group}/partitions/{p}/checkpoint?{API}"))
                    .header("Authorization", &token)
                    .json(&json!({"sequenceNumber": last["sequenceNumber"]}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        }
    }
    // Nothing beyond: past the last checkpoint every partition is empty, so an extra copy stored after the
    // expected count was reached would show here.
    for p in 0..4u32 {
        let url = format!(
            "{base}/messages/events/consumerGroups/{group}/partitions/{p}?{API}&max-count=1000"
        );
        let page: Value = http
            .get(url)
            .header("Authorization", &token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            page["events"].as_array().unwrap().len(),
            0,
            "{group}: partition {p} holds events beyond those acknowledged"
        );
    }
    seen
}

#[tokio::test]
async fn sixteen_writers_on_two_hubs_and_concurrent_readers_lose_nothing() {
    let hub = TestHub::start().await;
    // A second hub process on the same database: its transactions race the first's on the same partitions.
    let listeners = iothub::Listeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls: None,
        metrics: None,
        mqtts: None,
        mqtt: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = iothub::launch(hub.config.clone(), hub.db.clone(), listeners, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let bases = [hub.base.clone(), format!("http://{}", second.http_addr)];

    let service = hub.policy_token("service").await;
    let response = hub
        .request(
            Method::PUT,
            "/messages/events/consumerGroups/second",
            &service,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let writers = 16;
    let sends_per_writer = 40;
    // Every 4th send is a batch of 3, the rest single messages.
    let per_writer = (0..sends_per_writer)
        .map(|s| if s % 4 == 3 { 3 } else { 1 })
        .sum::<usize>();
    let expected = writers * per_writer;

    let readers: Vec<_> = ["$Default", "second"]
        .into_iter()
        .map(|group| {
            tokio::spawn(read_group(
                hub.http.clone(),
                hub.base.clone(),
                service.clone(),
                group.to_string(),
                expected,
            ))
        })
        .collect();

    let mut tasks = Vec::new();
    for w in 0..writers {
        let id = format!("writer-{w}");
        let device = hub.create_device(&id).await;
        let token = device_token(&id, &primary_key(&device));
        let http = hub.http.clone();
        let bases = bases.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0;
            for s in 0..sends_per_writer {
                let base = &bases[(w + s) % 2];
                let url = format!("{base}/devices/{id}/messages/events?{API}");
                let request = http.post(url).header("Authorization", &token);
                let (request, bodies) = if s % 4 == 3 {
                    let bodies: Vec<String> = (n..n + 3).map(|k| k.to_string()).collect();
                    let batch: Vec<Value> = bodies
                        .iter()
                        .map(|b| json!({"body": BASE64.encode(b)}))
                        .collect();
                    let request = request
                        .header("Content-Type", "application/vnd.microsoft.iothub.json")
                        .body(serde_json::to_string(&batch).unwrap());
                    (request, bodies)
                } else {
                    (request.body(n.to_string()), vec![n.to_string()])
                };
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 204, "{id} send {s}");
                n += bodies.len();
                acked.extend(bodies.into_iter().map(|b| (id.clone(), b)));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    assert_eq!(acked.len(), expected);

    for reader in readers {
        let seen = reader.await.unwrap();
        // Exactly once: same multiset, no duplicates.
        let unique: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "duplicates read");
        assert_eq!(unique, acked.iter().cloned().collect::<HashSet<_>>());
        // In order per device.
        let mut per_device: HashMap<String, Vec<usize>> = HashMap::new();
        for (device, body) in &seen {
            per_device
                .entry(device.clone())
                .or_default()
                .push(body.parse().unwrap());
        }
        for (device, bodies) in per_device {
            assert_eq!(
                bodies,
                (0..per_writer).collect::<Vec<_>>(),
                "order of {device}"
            );
        }
    }
    // What is stored, by the hub's own count: sequence numbers run from 0 without a gap (the readers checked), so
    // the last one of each partition counts its events; the total is what was acknowledged, no more, no less.
    let info: Value = hub
        .request(Method::GET, "/messages/events", &service)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored: i64 = info["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lastSequenceNumber"].as_i64().map_or(0, |last| last + 1))
        .sum();
    assert_eq!(stored, acked.len() as i64, "events stored vs acknowledged");
    let _ = stop.send(());
    second.wait().await.unwrap();
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    data: Value,
}

/// Opens the stream (with `query`, e.g. `?body=decoded`) and reads `count` events, then drops the connection.
async fn read_sse(
    hub: &TestHub,
    group: &str,
    query: &str,
    last_event_id: Option<&str>,
    count: usize,
) -> Vec<Sse> {
    let token = hub.policy_token("service").await;
    let mut request = hub.request(
        Method::GET,
        &format!("/messages/events/consumerGroups/{group}/stream{query}"),
        &token,
    );
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let mut response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream goes on");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let (mut id, mut data) = (None, None);
            for line in frame.lines() {
                if let Some(v) = line
                    .strip_prefix("id: ")
                    .or_else(|| line.strip_prefix("id:"))
                {
                    id = Some(v.to_string());
                } else if let Some(v) = line
                    .strip_prefix("data: ")
                    .or_else(|| line.strip_prefix("data:"))
                {
                    data = Some(serde_json::from_str(v).unwrap());
                }
            }
            if let (Some(id), Some(data)) = (id, data) {
                if events.len() < count {
                    events.push(Sse { id, data });
                }
            }
        }
    }
    events
}

fn key(e: &Sse) -> (String, String) {
    (
        e.data["deviceId"].as_str().unwrap().to_string(),
        body_text(&e.data),
    )
}

#[tokio::test]
async fn sse_stream_resumes_with_last_event_id_and_starts_after_checkpoints() {
    let hub = TestHub::start().await;
    let mut tokens = Vec::new();
    for i in 0..3 {
        let id = format!("sse-{i}");
        let device = hub.create_device(&id).await;
        tokens.push((id.clone(), device_token(&id, &primary_key(&device))));
    }
    let send = |n: usize| {
        let (id, token) = tokens[n % 3].clone();
        let request = hub
            .request(
                Method::POST,
                &format!("/devices/{id}/messages/events"),
                &token,
            )
            .body(format!("m{n}"));
        async move {
            assert_eq!(request.send().await.unwrap().status(), 204);
        }
    };
    for n in 0..6 {
        send(n).await;
    }

    let first = read_sse(&hub, "$Default", "", None, 3).await;
    for e in &first {
        // The id starts with the event's own partition and sequence number, then every other partition.
        let own = format!(
            "{}:{}",
            e.data["partitionId"].as_str().unwrap(),
            e.data["sequenceNumber"]
        );
        assert!(e.id.starts_with(&format!("{own},")), "{} vs {own}", e.id);
        assert_eq!(e.id.split(',').count(), 4);
    }
    for n in 6..10 {
        send(n).await;
    }
    let rest = read_sse(&hub, "$Default", "", Some(&first.last().unwrap().id), 7).await;
    let mut all: Vec<(String, String)> = first.iter().chain(&rest).map(key).collect();
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        10,
        "no duplicates across the reconnect: {all:?}"
    );
    all.sort();
    let mut expected: Vec<(String, String)> = (0..10)
        .map(|n| (format!("sse-{}", n % 3), format!("m{n}")))
        .collect();
    expected.sort();
    assert_eq!(all, expected);
    // Per device, in order across both connections.
    for i in 0..3 {
        let device = format!("sse-{i}");
        let bodies: Vec<String> = first
            .iter()
            .chain(&rest)
            .map(key)
            .filter(|(d, _)| *d == device)
            .map(|(_, b)| b)
            .collect();
        let mut sorted = bodies.clone();
        sorted.sort_by_key(|b| b[1..].parse::<usize>().unwrap());
        assert_eq!(bodies, sorted);
    }

    // Without Last-Event-ID a group starts after its checkpoints: checkpoint everything, send one more.
    let token = hub.policy_token("service").await;
    let info: Value = hub
        .request(Method::GET, "/messages/events", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for p in info["partitions"].as_array().unwrap() {
        if let Some(last) = p["lastSequenceNumber"].as_i64() {
            let response = hub
                .request(
                    Method::PUT,
                    &format!(
                        "/messages/events/consumerGroups/$Default/partitions/{}/checkpoint",
                        p["partitionId"].as_str().unwrap()
                    ),
                    &token,
                )
                .json(&json!({"sequenceNumber": last}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    }
    send(10).await;
    let after = read_sse(&hub, "$Default", "", None, 1).await;
    assert_eq!(key(&after[0]), ("sse-1".to_string(), "m10".to_string()));

    // Bad Last-Event-ID and unknown group.
    let response = hub
        .request(
            Method::GET,
            "/messages/events/consumerGroups/$Default/stream",
            &token,
        )
        .header("Last-Event-ID", "garbage")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
    let response = hub
        .request(
            Method::GET,
            "/messages/events/consumerGroups/nobody/stream",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
}

#[tokio::test]
async fn sse_stream_carries_the_body_forms_its_url_asks_for_across_resumes() {
    let hub = TestHub::start().await;
    let device = hub.create_device("forms").await;
    let token = device_token("forms", &primary_key(&device));
    let batch = json!([
        {"body": r#"{"n":0}"#, "base64Encoded": false, "properties": {"iothub-contenttype": "application/json"}},
        {"body": "one", "base64Encoded": false, "properties": {"iothub-contenttype": "text/plain"}},
        {"body": BASE64.encode([2u8, 255]), "properties": {"iothub-contenttype": "application/octet-stream"}},
        {"body": r#"{"n":3}"#, "base64Encoded": false, "properties": {"iothub-contenttype": "application/json"}},
    ]);
    let response = hub
        .request(Method::POST, "/devices/forms/messages/events", &token)
        .header("Content-Type", "application/vnd.microsoft.iothub.json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let fields = |e: &Sse| -> Vec<&str> {
        ["body", "bodyJson", "bodyText"]
            .into_iter()
            .filter(|f| e.data.get(*f).is_some())
            .collect()
    };

    let decoded = read_sse(&hub, "$Default", "?body=decoded", None, 3).await;
    assert_eq!(decoded[0].data["bodyJson"], json!({"n": 0}));
    let forms: Vec<Vec<&str>> = decoded.iter().map(fields).collect();
    assert_eq!(forms, [vec!["bodyJson"], vec!["bodyText"], vec!["body"]]);
    assert_eq!(decoded[1].data["bodyText"], "one");
    assert_eq!(decoded[2].data["body"], BASE64.encode([2u8, 255]));

    // The id carries positions only: a resume may name another format and continues at the same place.
    let last = decoded.last().unwrap().id.clone();
    let resumed = read_sse(&hub, "$Default", "?body=base64", Some(&last), 1).await;
    assert_eq!(resumed[0].data["sequenceNumber"], 3);
    assert_eq!(fields(&resumed[0]), ["body"]);
    assert_eq!(resumed[0].data["body"], BASE64.encode(r#"{"n":3}"#));
    // The default is every form, as before the parameter existed.
    let resumed = read_sse(&hub, "$Default", "", Some(&last), 1).await;
    assert_eq!(fields(&resumed[0]), ["body", "bodyJson", "bodyText"]);
    let resumed = read_sse(&hub, "$Default", "?body=ALL", Some(&last), 1).await;
    assert_eq!(fields(&resumed[0]), ["body", "bodyJson", "bodyText"]);
    assert_eq!(resumed[0].data["bodyText"], r#"{"n":3}"#);

    // A bad value is refused before the stream starts.
    let service = hub.policy_token("service").await;
    let response = hub
        .request(
            Method::GET,
            "/messages/events/consumerGroups/$Default/stream?body=text",
            &service,
        )
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
}
