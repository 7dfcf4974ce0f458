//! The unmodified Azure IoT device SDKs against a real hub process over MQTT with TLS (the local CA): Python
//! `azure-iot-device` over MQTT and over WebSockets, Node `azure-iot-device-mqtt` (Mqtt and MqttWs). Each sends
//! telemetry with properties and receives cloud-to-device messages; the REST API shows what arrived and how the
//! messages ended. `.ci/sdk` installs the SDKs, at the versions pinned under tests/sdk/, into target/sdk.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Telemetry messages each device sends, and C2D messages it receives (the last enqueued once it is connected).
const SEND: usize = 3;
const RECEIVE: usize = 3;

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("sdk")
}

/// The program running an SDK, when `.ci/sdk` has installed it; in CI its absence is a failure.
fn installed(what: &str, marker: PathBuf) -> bool {
    if marker.exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the {what} SDK is installed in CI (.ci/run runs .ci/sdk): {} is missing",
        marker.display()
    );
    eprintln!("SKIPPED: the {what} SDK is not installed (run .ci/sdk)");
    false
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A hub process serving MQTT over TLS and HTTPS (with MQTT over WebSockets) with its local CA, for host name
/// `localhost`, beside an in-process hub on the same database that the test uses for the REST API.
struct Setup {
    rest: TestHub,
    _process: HubProcess,
    dir: PathBuf,
    mqtts: u16,
    https: u16,
}

impl Setup {
    async fn start(name: &str) -> Setup {
        let rest = TestHub::start().await;
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // The SDKs cannot be told a port; the test picks free ones and hands them to the hub.
        let (mqtts, https) = (free_port(), free_port());
        let process = HubProcess::start_with(
            &rest.database_url(),
            &dir,
            &[
                ("IOTHUB_HOSTNAME", "localhost"),
                ("IOTHUB_MQTTS_LISTEN", &format!("127.0.0.1:{mqtts}")),
                ("IOTHUB_TLS_LISTEN", &format!("127.0.0.1:{https}")),
                ("RUST_LOG", "info"),
                ("NO_COLOR", "1"),
            ],
            Some(&dir.join("hub.log")),
        )
        .await;
        Setup {
            rest,
            _process: process,
            dir,
            mqtts,
            https,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    /// Registers `id`; its connection string for the hub process.
    async fn device(&self, id: &str) -> String {
        let device = self.rest.create_device(id).await;
        format!(
            "HostName=localhost;DeviceId={id};SharedAccessKey={}",
            primary_key(&device)
        )
    }

    /// Enqueues C2D message `n` for `id` over REST, with full acknowledgement; its sequence number.
    async fn enqueue(&self, id: &str, n: usize) -> i64 {
        let response = self
            .rest
            .request(
                Method::POST,
                &format!("{}/commands", device_path(id)),
                &self.rest.owner().await,
            )
            .header("iothub-messageid", format!("c2d-{n}"))
            .header("iothub-correlationid", format!("c2d-corr-{n}"))
            .header("iothub-ack", "full")
            .header("iothub-app-order", n.to_string())
            .body(format!("command {n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let answer: Value = response.json().await.unwrap();
        answer["sequenceNumber"].as_i64().unwrap()
    }

    /// Runs a device script: enqueues the C2D messages around it, and returns its JSON summary.
    async fn run(&self, id: &str, mut command: tokio::process::Command) -> Value {
        let connection_string = self.device(id).await;
        let mut sequence_numbers = Vec::new();
        for n in 0..RECEIVE - 1 {
            sequence_numbers.push(self.enqueue(id, n).await);
        }
        let ready = self.dir.join(format!("{id}.ready"));
        let child = command
            .env("DEVICE_CONNECTION_STRING", connection_string)
            .arg("--ready-file")
            .arg(&ready)
            .args([
                "--send",
                &SEND.to_string(),
                "--receive",
                &RECEIVE.to_string(),
            ])
            .args(["--tag", id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let output = tokio::spawn(child.wait_with_output());
        wait_until(&format!("{id} connects"), || {
            let (ready, output) = (ready.clone(), output.is_finished());
            async move { ready.exists() || output }
        })
        .await;
        if ready.exists() {
            self.wait_for_state(id, "Connected").await;
        }
        // One more while the device is connected: it reaches it without a reconnect.
        sequence_numbers.push(self.enqueue(id, RECEIVE - 1).await);
        let output = tokio::time::timeout(Duration::from_secs(90), output)
            .await
            .unwrap_or_else(|_| panic!("{id} did not finish; hub log: {}", self.log()))
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{id}: {}\nstdout: {stdout}\nstderr: {stderr}\nhub log: {}",
            output.status,
            self.log()
        );
        let summary: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("{id}: {e}: {stdout}"));
        eprintln!("{id}: {}", summary["sdk"]);
        self.wait_for_state(id, "Disconnected").await;
        self.check(id, &summary, &sequence_numbers).await;
        summary
    }

    /// Waits until the registry shows `id` in `state` (`connectionState`).
    async fn wait_for_state(&self, id: &str, state: &str) {
        let owner = self.rest.owner().await;
        wait_until(&format!("{id} {state}"), || {
            let request = self.rest.request(Method::GET, &device_path(id), &owner);
            async move {
                let device: Value = request.send().await.unwrap().json().await.unwrap();
                device["connectionState"] == state
            }
        })
        .await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default()
    }

    /// What the REST API shows after a device's run: its telemetry, and its C2D messages completed.
    async fn check(&self, id: &str, summary: &Value, sequence_numbers: &[i64]) {
        let sent: Vec<String> = (0..SEND).map(|i| format!("{id}-{i}")).collect();
        assert_eq!(summary["sent"], json!(sent), "{id}");
        let events: Vec<Value> = self
            .rest
            .events()
            .await
            .into_iter()
            .filter(|e| e["deviceId"] == id)
            .collect();
        assert_eq!(events.len(), SEND, "{id}: {events:#?}");
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["bodyJson"], json!({"n": i, "from": id}), "{id}");
            assert_eq!(
                event["properties"],
                json!({"seq": i.to_string(), "sdk": id})
            );
            let system = &event["systemProperties"];
            assert_eq!(system["iothub-messageid"], format!("{id}-{i}"));
            assert_eq!(system["iothub-correlationid"], format!("corr-{i}"));
            assert_eq!(system["iothub-contentencoding"], "utf-8");
            assert_eq!(event["contentType"], "application/json");
            assert_eq!(system["iothub-connection-device-id"], id);
        }
        let mut received = summary["received"].as_array().unwrap().clone();
        received.sort_by_key(|m| m["message_id"].as_str().unwrap_or("").to_string());
        for (n, message) in received.iter().enumerate() {
            assert_eq!(message["data"], format!("command {n}"), "{id}: {message}");
            assert_eq!(message["message_id"], format!("c2d-{n}"));
            assert_eq!(message["correlation_id"], format!("c2d-corr-{n}"));
            assert_eq!(message["custom_properties"]["order"], n.to_string());
        }
        assert_eq!(received.len(), RECEIVE, "{id}");
        // The device's PUBACK completed each one: outcome Success, and a Success feedback record.
        let owner = self.rest.owner().await;
        for sequence_number in sequence_numbers {
            let path = format!("{}/commands/{sequence_number}", device_path(id));
            wait_until(
                &format!("{id}: message {sequence_number} completes"),
                || {
                    let request = self.rest.request(Method::GET, &path, &owner);
                    async move {
                        let status: Value = request.send().await.unwrap().json().await.unwrap();
                        status["state"] == "Completed" && status["outcome"] == "Success"
                    }
                },
            )
            .await;
        }
    }

    /// Feedback records of every device so far, by device id: their status codes.
    async fn feedback(&self) -> Vec<(String, String)> {
        let owner = self.rest.owner().await;
        let mut records = Vec::new();
        loop {
            let response = self
                .rest
                .request(Method::GET, "/messages/serviceBound/feedback", &owner)
                .send()
                .await
                .unwrap();
            if response.status() == 204 {
                return records;
            }
            let lock = response.headers()["etag"]
                .to_str()
                .unwrap()
                .trim_matches('"')
                .to_string();
            let batch: Vec<Value> = response.json().await.unwrap();
            for record in batch {
                records.push((
                    record["deviceId"].as_str().unwrap().to_string(),
                    record["statusCode"].as_str().unwrap().to_string(),
                ));
            }
            let done = self
                .rest
                .request(
                    Method::DELETE,
                    &format!("/messages/serviceBound/feedback/{lock}"),
                    &owner,
                )
                .send()
                .await
                .unwrap();
            assert_eq!(done.status(), 204);
        }
    }

    /// Each device's C2D messages gave one Success feedback record.
    async fn assert_feedback(&self, ids: &[&str]) {
        let records = self.feedback().await;
        for id in ids {
            let mine: Vec<&String> = records
                .iter()
                .filter(|(device, _)| device == id)
                .map(|(_, code)| code)
                .collect();
            assert_eq!(mine, vec!["Success"; RECEIVE], "{id}: {records:?}");
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// An HTTP CONNECT proxy (the Python SDK's `proxy_options`) that takes the SDK's connections to IoT Hub's ports on
/// `localhost` to the hub's: 8883 to its MQTT-over-TLS listener, 443 to its HTTPS listener. It records what the
/// SDK asked for.
async fn proxy(mqtts: u16, https: u16) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                let mut request = String::new();
                client.read_line(&mut request).await.ok()?;
                loop {
                    let mut header = String::new();
                    client.read_line(&mut header).await.ok()?;
                    if header.trim().is_empty() {
                        break;
                    }
                }
                let target = request.split_whitespace().nth(1)?.to_string();
                log.lock().unwrap().push(target.clone());
                let port = match target.as_str() {
                    "localhost:8883" => mqtts,
                    "localhost:443" => https,
                    _ => {
                        let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
                        return None;
                    }
                };
                let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()?;
                let mut client = client.into_inner();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .ok()?;
                tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .ok()
            });
        }
    });
    (port, asked)
}

fn python(setup: &Setup, proxy_port: u16, websockets: bool) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(sdk_dir().join("python/bin/python"));
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/python/device.py"
        ))
        .arg("--ca")
        .arg(setup.ca())
        .args(["--proxy", &format!("127.0.0.1:{proxy_port}")]);
    if websockets {
        command.arg("--websockets");
    }
    command
}

fn node(setup: &Setup, transport: &str) -> tokio::process::Command {
    let port = match transport {
        "ws" => setup.https,
        _ => setup.mqtts,
    };
    let mut command = tokio::process::Command::new("node");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/node/device.js"
        ))
        .env("NODE_PATH", sdk_dir().join("node/node_modules"))
        .arg("--ca")
        .arg(setup.ca())
        .args(["--transport", transport, "--port", &port.to_string()]);
    command
}

#[tokio::test]
async fn the_python_sdk_sends_and_receives_over_mqtt_and_websockets() {
    if !installed("Python", sdk_dir().join("python/bin/python")) {
        return;
    }
    let setup = Setup::start("sdk-python").await;
    let (proxy_port, asked) = proxy(setup.mqtts, setup.https).await;
    setup
        .run("python-mqtt", python(&setup, proxy_port, false))
        .await;
    setup
        .run("python-ws", python(&setup, proxy_port, true))
        .await;
    // The SDK went to HostName on IoT Hub's own ports.
    let asked = asked.lock().unwrap().clone();
    assert!(asked.iter().any(|t| t == "localhost:8883"), "{asked:?}");
    assert!(asked.iter().any(|t| t == "localhost:443"), "{asked:?}");
    setup.assert_feedback(&["python-mqtt", "python-ws"]).await;
}

#[tokio::test]
async fn the_node_sdk_sends_and_receives_over_mqtt_and_websockets() {
    if !installed(
        "Node",
        sdk_dir().join("node/node_modules/azure-iot-device-mqtt"),
    ) {
        return;
    }
    let setup = Setup::start("sdk-node").await;
    setup.run("node-mqtt", node(&setup, "mqtt")).await;
    setup.run("node-ws", node(&setup, "ws")).await;
    setup.assert_feedback(&["node-mqtt", "node-ws"]).await;
}
