//! A hub process's life around its requests, with the real binary: several processes migrating one fresh database
//! at once, the periodic retention tasks dropping what has expired, and SIGTERM letting requests in flight finish.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API: &str = "api-version=2021-04-12";

async fn owner(pool: &PgPool) -> String {
    let key = iothub::auth::policies::get(pool, "iothubowner")
        .await
        .unwrap()
        .unwrap()
        .primary_key;
    iothub::auth::sas::sign(HOST, &key, Some("iothubowner"), now() + 3600).unwrap()
}

/// Creates a device through `base`; its token.
async fn device(http: &reqwest::Client, base: &str, owner: &str, id: &str) -> String {
    let response = http
        .put(format!("{base}/devices/{id}?{API}"))
        .header("Authorization", owner)
        .json(&json!({"deviceId": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "create {id}");
    let created: Value = response.json().await.unwrap();
    device_token(id, &primary_key(&created))
}

fn data_dir(db: &TestDb) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{}", db.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_and_a_migrate_command_migrate_one_fresh_database_at_once() {
    let db = TestDb::create().await;
    let url = db.url();
    let dir = data_dir(&db);
    std::fs::create_dir_all(&dir).unwrap();
    let logs: Vec<_> = (0..3).map(|i| dir.join(format!("hub-{i}.log"))).collect();
    // All three, and `iothub migrate`, start on the empty database at the same moment; each hub must come up
    // (ready) by itself, and the migrate command succeed.
    let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_iothub"))
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .env("IOTHUB_DATA_DIR", &dir)
        .env("RUST_LOG", "warn")
        .output();
    let (a, b, c, migrated) = tokio::join!(
        HubProcess::start_with(&url, &dir, &[], Some(&logs[0])),
        HubProcess::start_with(&url, &dir, &[], Some(&logs[1])),
        HubProcess::start_with(&url, &dir, &[], Some(&logs[2])),
        migrate,
    );
    let migrated = migrated.unwrap();
    assert!(
        migrated.status.success(),
        "iothub migrate beside starting hubs: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    // The schema: every migration applied exactly once, successfully.
    let pool = db.pool().await;
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("sql".as_ref()))
        .count() as i64;
    let (applied, ok): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE success) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((applied, ok), (migrations, migrations));
    // IoT Hub's five default policies, made once by whichever process came first.
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM policies ORDER BY name")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        names,
        [
            "device",
            "iothubowner",
            "registryRead",
            "registryReadWrite",
            "service"
        ]
    );

    // And the three act as one hub: a device made through one sends through another, read through the third.
    let http = reqwest::Client::new();
    let owner = owner(&pool).await;
    let token = device(&http, &a.base, &owner, "migrated").await;
    let sent = http
        .post(format!("{}/devices/migrated/messages/events?{API}", b.base))
        .header("Authorization", &token)
        .body("after a concurrent migration")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 204);
    let info: Value = http
        .get(format!("{}/messages/events?{API}", c.base))
        .header("Authorization", &owner)
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
        .filter_map(|p| p["lastSequenceNumber"].as_i64())
        .map(|last| last + 1)
        .sum();
    assert_eq!(stored, 1);
    for hub in [a, b, c] {
        hub.kill().await;
    }
    // No process logged an error or a warning while migrating and serving.
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            !text.contains("ERROR") && !text.contains("WARN"),
            "{}: {text}",
            log.display()
        );
    }
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_retention_drops_expired_events_and_ended_commands() {
    let db = TestDb::create().await;
    let url = db.url();
    let dir = data_dir(&db);
    let hub = HubProcess::start_with(
        &url,
        &dir,
        &[
            ("IOTHUB_D2C_MAINTENANCE_SECS", "1"),
            ("IOTHUB_FEEDBACK_TTL_SECS", "1"),
            ("IOTHUB_C2D_SWEEP_INTERVAL_MS", "100"),
        ],
        None,
    )
    .await;
    let pool = db.pool().await;
    let http = reqwest::Client::new();
    let owner = owner(&pool).await;
    let token = device(&http, &hub.base, &owner, "kept").await;

    // An hour of events from long ago, created after the hub started: only the periodic task can drop it (the
    // run at start-up is over).
    sqlx::query(
        "CREATE TABLE d2c_events_2020010100 PARTITION OF d2c_events
         FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-01 01:00:00+00')",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO d2c_events (partition_id, seq, enqueued_at, device_id, system_properties, properties, body)
         VALUES (0, 1000000, '2020-01-01 00:30:00+00', 'ancient', '{}', '{}', 'old')",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Today's telemetry, which retention keeps.
    let sent = http
        .post(format!("{}/devices/kept/messages/events?{API}", hub.base))
        .header("Authorization", &token)
        .body("fresh")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 204);

    // A command completed (ack full, so a feedback record too): ended, kept for the feedback TTL (1 s), then gone.
    let response = http
        .post(format!("{}/devices/kept/commands?{API}", hub.base))
        .header("Authorization", &owner)
        .header("iothub-ack", "full")
        .body("done soon")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let seq = response.json::<Value>().await.unwrap()["sequenceNumber"]
        .as_i64()
        .unwrap();
    let received = http
        .get(format!(
            "{}/devices/kept/messages/deviceBound?{API}",
            hub.base
        ))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(received.status(), 200);
    let lock = received.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let completed = http
        .delete(format!(
            "{}/devices/kept/messages/deviceBound/{lock}?{API}",
            hub.base
        ))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(completed.status(), 204);

    let (pool_ref, http_ref, owner_ref) = (&pool, &http, &owner);
    wait_until(
        "the expired time partition is dropped",
        move || async move {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass('d2c_events_2020010100') IS NULL")
                .fetch_one(pool_ref)
                .await
                .unwrap()
        },
    )
    .await;
    let ancient: i64 =
        sqlx::query_scalar("SELECT count(*) FROM d2c_events WHERE device_id = 'ancient'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(ancient, 0);
    let status_url = format!("{}/devices/kept/commands/{seq}?{API}", hub.base);
    let status_url = &status_url;
    wait_until("the ended command is deleted", move || async move {
        http_ref
            .get(status_url)
            .header("Authorization", owner_ref)
            .send()
            .await
            .unwrap()
            .status()
            == 404
    })
    .await;
    wait_until(
        "the expired feedback record is deleted",
        move || async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM feedback_records")
                .fetch_one(pool_ref)
                .await
                .unwrap()
                == 0
        },
    )
    .await;
    let feedback = http
        .get(format!("{}/messages/serviceBound/feedback?{API}", hub.base))
        .header("Authorization", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(feedback.status(), 204, "expired feedback is not delivered");

    // Today's event is still there.
    let info: Value = http
        .get(format!("{}/messages/events?{API}", hub.base))
        .header("Authorization", &owner)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut fresh = 0;
    for p in info["partitions"].as_array().unwrap() {
        let page: Value = http
            .get(format!(
                "{}/messages/events/partitions/{}?{API}&from=start",
                hub.base,
                p["partitionId"].as_str().unwrap()
            ))
            .header("Authorization", &owner)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        fresh += page["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["deviceId"] == "kept")
            .count();
    }
    assert_eq!(fresh, 1, "retention keeps today's events");
    hub.kill().await;
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Reads from `stream` until `marker` has arrived; everything read.
async fn read_until(stream: &mut tokio::net::TcpStream, marker: &str) -> String {
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains(marker) {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{marker:?} within 30 s; got {text:?}"))
            .unwrap();
        assert!(n > 0, "connection closed before {marker:?}; got {text:?}");
        text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    text
}

/// Opens a connection to `addr` and sends `path`'s head (with `Expect: 100-continue`) and the first half of its
/// body; returns once the hub has said "100 Continue", so its handler is surely reading the body.
async fn half_sent(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
    body: &str,
) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path}?{API} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\n\
         iothub-messageid: in-flight\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    read_until(&mut stream, "100 Continue\r\n\r\n").await;
    stream
        .write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .unwrap();
    stream
}

/// Sends the rest of `body` on a `half_sent` stream; the answer's head.
async fn finish(stream: &mut tokio::net::TcpStream, body: &str) -> String {
    stream
        .write_all(&body.as_bytes()[body.len() / 2..])
        .await
        .unwrap();
    read_until(stream, "\r\n\r\n").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish() {
    let db = TestDb::create().await;
    let url = db.url();
    let dir = data_dir(&db);
    let hub = HubProcess::start(&url, &dir).await;
    let pool = db.pool().await;
    let http = reqwest::Client::new();
    let owner = owner(&pool).await;
    let device_token = device(&http, &hub.base, &owner, "slow").await;

    // Two slow senders, a back-end enqueuing a command and the device sending telemetry: each has sent its head
    // and half its body when SIGTERM arrives.
    let body = "x".repeat(64);
    let mut command = half_sent(hub.addr(), "/devices/slow/commands", &owner, &body).await;
    let mut telemetry = half_sent(
        hub.addr(),
        "/devices/slow/messages/events",
        &device_token,
        &body,
    )
    .await;

    hub.terminate();
    // New connections are refused once the hub stops accepting...
    let addr = hub.addr();
    wait_until("new connections are refused", move || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // ...while the requests in flight still get their normal answers, and are stored.
    let answer = finish(&mut command, &body).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "command: {answer}");
    let answer = finish(&mut telemetry, &body).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "telemetry: {answer}");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM c2d_messages WHERE message_id = 'in-flight'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, 1, "the command is stored");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM d2c_events WHERE device_id = 'slow'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, 1, "the telemetry is stored");

    let status = hub.exit_status(Duration::from_secs(60)).await;
    assert!(status.success(), "a clean exit after SIGTERM: {status}");
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
}
