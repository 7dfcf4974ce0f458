//! MQTT across hub processes: take-over when a device's second connection reaches another process, and a process
//! killed with SIGKILL while devices publish at QoS 1 loses no acknowledged message (a PUBACK means committed).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::mqtt::Client;
use common::*;
use iothub::mqtt::codec::{Packet, QoS};
use serde_json::Value;

/// A free local port for a process's plain MQTT listener.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Processes {
    db: TestDb,
    pool: sqlx::PgPool,
    owner: String,
    http: reqwest::Client,
}

impl Processes {
    async fn new() -> Processes {
        let db = TestDb::create().await;
        let pool = db.pool().await;
        iothub::prepare_database(&pool).await.unwrap();
        let key = iothub::auth::policies::get(&pool, "iothubowner")
            .await
            .unwrap()
            .unwrap()
            .primary_key;
        let owner = iothub::auth::sas::sign(HOST, &key, Some("iothubowner"), now() + 3600).unwrap();
        Processes {
            db,
            pool,
            owner,
            http: reqwest::Client::new(),
        }
    }

    /// A hub process with plain MQTT on `mqtt`.
    async fn start(&self, mqtt: SocketAddr) -> HubProcess {
        let data_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "mqtt-{}-{}",
            self.db.name,
            mqtt.port()
        ));
        let listen = mqtt.to_string();
        HubProcess::start_with(
            &self.db.url(),
            &data_dir,
            &[("IOTHUB_MQTT_LISTEN", listen.as_str())],
            None,
        )
        .await
    }

    /// Registers a device through `hub`; its primary key.
    async fn device(&self, hub: &HubProcess, id: &str) -> String {
        let device: Value = self
            .http
            .put(format!("{}/devices/{id}?api-version=2021-04-12", hub.base))
            .header("Authorization", &self.owner)
            .json(&serde_json::json!({"deviceId": id}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        primary_key(&device)
    }
}

#[tokio::test]
async fn a_connection_to_another_process_takes_over() {
    let p = Processes::new().await;
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let a = p.start(addr_a).await;
    let b = p.start(addr_b).await;
    let key = p.device(&a, "dev-1").await;

    let mut first = Client::connect(addr_a, "dev-1", &key).await;
    first.ping().await;
    let mut second = Client::connect(addr_b, "dev-1", &key).await;
    // The first connection, in the other process, is closed by the second's take-over.
    first.assert_closed().await;
    second.ping().await;
    let state: String =
        sqlx::query_scalar("SELECT connection_state FROM devices WHERE device_id = 'dev-1'")
            .fetch_one(&p.pool)
            .await
            .unwrap();
    assert_eq!(state, "Connected");
    // And back again.
    let mut third = Client::connect(addr_a, "dev-1", &key).await;
    second.assert_closed().await;
    third.ping().await;
    a.kill().await;
    b.kill().await;
}

#[tokio::test]
async fn a_killed_process_loses_no_acknowledged_telemetry() {
    const DEVICES: usize = 4;
    const PER_DEVICE: u16 = 5000;
    const WINDOW: u16 = 8;
    let p = Processes::new().await;
    let addr = free_addr();
    let hub = p.start(addr).await;
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mut publishers = Vec::new();
    for d in 0..DEVICES {
        let id = format!("dev-{d}");
        let key = p.device(&hub, &id).await;
        let acked = acked.clone();
        publishers.push(tokio::spawn(async move {
            let mut client = Client::connect(addr, &id, &key).await;
            let topic = |n: u16| format!("devices/{id}/messages/events/%24.mid={id}-{n}");
            let mut next = 1u16;
            // Up to WINDOW messages in flight; each PUBACK goes to the ledger, until the hub dies.
            while next <= WINDOW.min(PER_DEVICE) {
                client
                    .publish(&topic(next), QoS::AtLeastOnce, next, b"x")
                    .await;
                next += 1;
            }
            while let Some(packet) = client.recv().await {
                let Packet::PubAck(ack) = packet else {
                    panic!("unexpected {packet:?}");
                };
                acked.lock().unwrap().insert(format!("{id}-{}", ack.pkid));
                if next <= PER_DEVICE {
                    client
                        .publish(&topic(next), QoS::AtLeastOnce, next, b"x")
                        .await;
                    next += 1;
                }
            }
        }));
    }
    wait_until("a hundred messages acknowledged", || async {
        acked.lock().unwrap().len() >= 100
    })
    .await;
    hub.kill().await;
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let stored: BTreeSet<String> =
        sqlx::query_scalar("SELECT system_properties->>'iothub-messageid' FROM d2c_events")
            .fetch_all(&p.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    eprintln!(
        "{} acknowledged, {} stored (the rest were in flight when the hub died)",
        acked.len(),
        stored.len()
    );
    assert!(
        acked.len() < DEVICES * PER_DEVICE as usize,
        "the kill came mid-way"
    );
}

#[tokio::test]
async fn a_taken_mqtt_port_is_a_start_up_error_naming_its_setting() {
    let p = Processes::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data_dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mqtt-taken-{}", p.db.name));
    let port = free_addr().port();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_iothub"))
        .arg("serve")
        .env("DATABASE_URL", p.db.url())
        .env("IOTHUB_LISTEN", format!("127.0.0.1:{port}"))
        .env("IOTHUB_DATA_DIR", &data_dir)
        .env("IOTHUB_MQTTS_LISTEN", "off")
        .env("IOTHUB_MQTT_LISTEN", &addr)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("IOTHUB_MQTT_LISTEN"), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    drop(taken);
}

#[tokio::test]
async fn a_c2d_message_enqueued_through_another_process_reaches_the_device_at_once() {
    let p = Processes::new().await;
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let a = p.start(addr_a).await;
    let b = p.start(addr_b).await;
    let key = p.device(&a, "dev-1").await;
    let service_key = iothub::auth::policies::get(&p.pool, "service")
        .await
        .unwrap()
        .unwrap()
        .primary_key;
    let service =
        iothub::auth::sas::sign(HOST, &service_key, Some("service"), now() + 3600).unwrap();

    let mut device = Client::connect(addr_a, "dev-1", &key).await;
    device.subscribe_c2d("dev-1").await;
    // Enqueued through the other process: the NOTIFY of its commit wakes the connection in this one.
    let response = p
        .http
        .post(format!(
            "{}/devices/dev-1/commands?api-version=2021-04-12",
            b.base
        ))
        .header("Authorization", &service)
        .body("across")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let publish = device.next_publish().await;
    assert_eq!(&publish.payload[..], b"across");
    device.puback(publish.pkid).await;
    device.ping().await;
    a.kill().await;
    b.kill().await;
}

#[tokio::test]
async fn a_stopping_process_closes_its_connections_and_marks_devices_disconnected() {
    let p = Processes::new().await;
    let addr = free_addr();
    let hub = p.start(addr).await;
    let key = p.device(&hub, "dev-1").await;
    let mut client = Client::connect(addr, "dev-1", &key).await;
    client.send_event("dev-1", "", 1, b"before").await;
    hub.terminate();
    client.assert_closed().await;
    let status = hub.exit_status(std::time::Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    let state: String =
        sqlx::query_scalar("SELECT connection_state FROM devices WHERE device_id = 'dev-1'")
            .fetch_one(&p.pool)
            .await
            .unwrap();
    assert_eq!(state, "Disconnected");
}
