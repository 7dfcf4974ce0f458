//! Keys and tokens never reach the log, even at the most verbose level.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use iothub::auth::sas;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn no_key_or_token_in_the_log_at_trace_level() {
    // The database is prepared by an in-process hub; the process under test is the real binary.
    let hub = TestHub::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mqtt_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("logs-{}", uuid::Uuid::new_v4()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_iothub"))
        .arg("serve")
        .env("DATABASE_URL", hub.database_url())
        .env("IOTHUB_LISTEN", format!("127.0.0.1:{port}"))
        .env("IOTHUB_HOSTNAME", HOST)
        // MQTT over TLS with the local CA, whose keys must stay out of the log too (never IoT Hub's 8883: tests run
        // side by side).
        .env("IOTHUB_DATA_DIR", &data_dir)
        .env("IOTHUB_MQTTS_LISTEN", "127.0.0.1:0")
        // Plain MQTT, where a device's token arrives as the CONNECT password.
        .env("IOTHUB_MQTT_LISTEN", format!("127.0.0.1:{mqtt_port}"))
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let owner = hub.owner().await;
    let url = |path: &str| format!("{base}{path}?api-version=2021-04-12");
    let created: serde_json::Value = http
        .put(url("/devices/logged"))
        .header("Authorization", &owner)
        .json(&serde_json::json!({"deviceId": "logged"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let device_key = primary_key(&created);
    let device_token = device_token("logged", &device_key);
    let forged = sas::sign(HOST, &sas::generate_key(), Some("iothubowner"), now() + 60).unwrap();
    for token in [&owner, &device_token, &forged] {
        http.get(url("/devices/logged"))
            .header("Authorization", token)
            .send()
            .await
            .unwrap();
    }
    http.get(url("/policies"))
        .header("Authorization", &owner)
        .send()
        .await
        .unwrap();
    // Over MQTT: a token that connects, and one signed with a key the device does not have.
    let forged_device = common::device_token("logged", &sas::generate_key());
    let mqtt_addr: std::net::SocketAddr = format!("127.0.0.1:{mqtt_port}").parse().unwrap();
    for (token, accepted) in [(&device_token, true), (&forged_device, false)] {
        let mut client = mqtt::Client::open(mqtt_addr).await;
        let ack = client
            .handshake(mqtt::Client::connect_packet("logged", token))
            .await;
        assert_eq!(
            ack.code == iothub::mqtt::codec::ConnectReturnCode::Success,
            accepted,
            "CONNECT answered {:?}",
            ack.code
        );
        client.send(iothub::mqtt::codec::Packet::Disconnect).await;
    }

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let log = log.await.unwrap();
    assert!(log.contains("iothub is serving"), "the log was captured");
    assert!(log.len() > 1000, "trace level logs a lot");

    let mut secrets: Vec<String> = vec![device_key, secondary_key(&created)];
    for policy in iothub::auth::policies::list(&hub.db).await.unwrap() {
        secrets.push(policy.primary_key);
        secrets.push(policy.secondary_key);
    }
    for token in [&owner, &device_token, &forged, &forged_device] {
        let sig = token
            .split("sig=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        secrets.push(sig.to_string());
        secrets.push(
            percent_encoding::percent_decode_str(sig)
                .decode_utf8_lossy()
                .into_owned(),
        );
    }
    for file in ["ca.key", "server.pem"] {
        let pem = std::fs::read_to_string(data_dir.join("tls").join(file)).unwrap();
        secrets.extend(
            pem.lines()
                .skip_while(|l| !l.contains("BEGIN PRIVATE KEY"))
                .skip(1)
                .take_while(|l| !l.contains("END PRIVATE KEY"))
                .map(str::to_string),
        );
    }
    assert!(!log.contains("PRIVATE KEY"), "a key reached the log");
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a secret reached the log");
    }
    assert!(
        !log.contains("SharedAccessSignature sr="),
        "a token reached the log"
    );
    let _ = std::fs::remove_dir_all(data_dir);
}
