//! Per-process limits over HTTP: a request that outlasts `IOTHUB_REQUEST_TIMEOUT_SECS` is answered 504 in IoT
//! Hub's shape (and a long poll ends before it), and beyond `IOTHUB_MAX_CONCURRENT_REQUESTS` requests wait for a
//! slot instead of failing.
//!
//! A request is made slow for real: the test holds an exclusive lock on the devices table, so a registry read
//! waits in PostgreSQL until the lock goes. The database shows which requests wait on it (`pg_stat_activity`).

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use sqlx::{Postgres, Transaction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Locks the devices table until the returned transaction ends: every registry read waits meanwhile.
async fn lock_devices(hub: &TestHub) -> Transaction<'static, Postgres> {
    let mut tx = hub.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Waits until `n` sessions of the hub's database wait on a lock.
async fn until_waiting_on_lock(hub: &TestHub, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&hub.db)
        .await
        .unwrap();
        if waiting == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waiting} sessions wait on a lock, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_request_that_outlasts_the_request_timeout_is_answered_504() {
    let hub = TestHub::start_with(|c| c.request_timeout_secs = 1).await;
    hub.create_device("slow").await;
    let owner = hub.owner().await;

    let lock = lock_devices(&hub).await;
    let response = hub
        .request(Method::GET, "/devices/slow", &owner)
        .send()
        .await
        .unwrap();
    assert_error(response, 504, "GatewayTimeout").await;
    lock.rollback().await.unwrap();

    // Served again once the database answers.
    let response = hub
        .request(Method::GET, "/devices/slow", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A long poll asking to wait longer than the timeout ends in time with its own answer, never a 504.
    let device = hub.create_device("poller").await;
    let token = device_token("poller", &primary_key(&device));
    let response = hub
        .request(
            Method::GET,
            "/devices/poller/messages/deviceBound?wait-ms=30000",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = hub
        .request(
            Method::GET,
            "/messages/serviceBound/feedback?wait-ms=30000",
            &owner,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_wait_for_a_slot() {
    let hub = TestHub::start_with(|c| c.max_concurrent_requests = 2).await;
    hub.create_device("busy").await;
    let owner = hub.owner().await;

    // Two registry reads take both slots and wait on the lock.
    let lock = lock_devices(&hub).await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let request = hub.request(Method::GET, "/devices/busy", &owner);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    until_waiting_on_lock(&hub, 2).await;

    // A third request, wholly sent, needs no database: it is answered only once a slot frees up.
    let mut third = tokio::net::TcpStream::connect(hub.running().http_addr)
        .await
        .unwrap();
    third
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "answered while both slots were taken: {early:?}"
    );
    // The slow pair did not pass the lock meanwhile: the limit, not the lock's end, held the third back.
    until_waiting_on_lock(&hub, 2).await;

    lock.rollback().await.unwrap();
    for request in slow {
        assert_eq!(request.await.unwrap(), 200);
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), third.read_to_end(&mut answer))
        .await
        .expect("the waiting request is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
