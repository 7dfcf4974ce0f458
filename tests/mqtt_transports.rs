//! MQTT over every transport the hub serves: TLS (the SDKs' port 8883), WebSockets on the HTTP listeners
//! (`/$iothub/websocket`, subprotocol `mqtt`), with rumqttc, a maintained MQTT client, as the device.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::mqtt::user_name;
use common::pki;
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

fn client_tls(ca_pem: &str) -> TlsConfiguration {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConfiguration::Rustls(Arc::new(config))
}

fn options(device: &str, key: &str, host: &str, port: u16, transport: Transport) -> MqttOptions {
    let mut options = MqttOptions::new(device, host, port);
    options.set_credentials(user_name(device), device_token(device, key));
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(transport);
    options
}

/// With `options`: sends one telemetry message at QoS 1 and waits for its PUBACK, subscribes to C2D, and
/// receives the message `enqueue` puts in the queue once subscribed (acknowledged by rumqttc's automatic PUBACK).
async fn round_trip(hub: &TestHub, device: &str, options: MqttOptions) {
    let (client, mut events) = AsyncClient::new(options, 10);
    let topic = format!("devices/{device}/messages/events/%24.mid=over-{device}");
    client
        .publish(&topic, QoS::AtLeastOnce, false, b"hello".to_vec())
        .await
        .unwrap();
    let c2d = format!("devices/{device}/messages/devicebound/#");
    client.subscribe(&c2d, QoS::AtLeastOnce).await.unwrap();
    let service = hub.policy_token("service").await;
    let (mut acked, mut subscribed) = (false, false);
    let mut received = None;
    tokio::time::timeout(LIVENESS, async {
        // Until both the telemetry's PUBACK and the C2D message came, in whichever order.
        while !(acked && received.is_some()) {
            match events.poll().await.expect("the connection stays up") {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success)
                }
                Event::Incoming(Packet::PubAck(_)) => acked = true,
                Event::Incoming(Packet::SubAck(_)) => {
                    subscribed = true;
                    let response = hub
                        .request(
                            reqwest::Method::POST,
                            &format!("/devices/{device}/commands"),
                            &service,
                        )
                        .body("to you")
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 201);
                }
                Event::Incoming(Packet::Publish(publish)) => received = Some(publish),
                _ => {}
            }
        }
    })
    .await
    .expect("the PUBACK and a C2D message arrive");
    assert!(subscribed);
    assert_eq!(&received.unwrap().payload[..], b"to you");
    let stored = hub.events().await;
    assert!(stored
        .iter()
        .any(|e| e["systemProperties"]["iothub-messageid"] == format!("over-{device}")));
    // Keep polling so rumqttc sends its PUBACK; the delivery completes.
    let mut state = serde_json::Value::Null;
    for _ in 0..3000 {
        let _ = tokio::time::timeout(Duration::from_millis(20), events.poll()).await;
        let status: serde_json::Value = hub
            .request(
                reqwest::Method::GET,
                &format!("/devices/{device}/commands/1"),
                &service,
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        state = status["state"].clone();
        if state == "Completed" {
            break;
        }
    }
    assert_eq!(state, "Completed", "the delivery is completed by PUBACK");
    drop(client);
}

#[tokio::test]
async fn mqtt_over_tls_carries_telemetry_and_c2d() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mqtts-{}", uuid::Uuid::new_v4()));
    let pki::Pki {
        ca_pem: ca,
        cert_path: cert,
        key_path: key,
    } = pki::make(&dir);
    let hub = TestHub::start_with(|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let device_key = primary_key(&hub.create_device("secure-1").await);
    let port = hub.mqtts_addr().port();
    let options = options(
        "secure-1",
        &device_key,
        "127.0.0.1",
        port,
        Transport::tls_with_config(client_tls(&ca)),
    );
    round_trip(&hub, "secure-1", options).await;
}

#[tokio::test]
async fn mqtt_over_websockets_carries_telemetry_and_c2d() {
    let hub = TestHub::start().await;
    let device_key = primary_key(&hub.create_device("web-1").await);
    let url = format!("ws://{}/$iothub/websocket", hub.running().http_addr);
    let options = options("web-1", &device_key, &url, 0, Transport::Ws);
    round_trip(&hub, "web-1", options).await;
}

#[tokio::test]
async fn mqtt_over_websockets_with_tls_on_the_https_listener() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("wss-{}", uuid::Uuid::new_v4()));
    let pki::Pki {
        ca_pem: ca,
        cert_path: cert,
        key_path: key,
    } = pki::make(&dir);
    let hub = TestHub::start_with(|c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let device_key = primary_key(&hub.create_device("web-2").await);
    let url = format!(
        "wss://127.0.0.1:{}/$iothub/websocket",
        hub.running().tls_addr.unwrap().port()
    );
    let options = options(
        "web-2",
        &device_key,
        &url,
        0,
        Transport::wss_with_config(client_tls(&ca)),
    );
    round_trip(&hub, "web-2", options).await;
}

#[tokio::test]
async fn plain_mqtt_with_rumqttc() {
    let hub = TestHub::start().await;
    let device_key = primary_key(&hub.create_device("plain-1").await);
    let addr = hub.mqtt_addr();
    let options = options(
        "plain-1",
        &device_key,
        "127.0.0.1",
        addr.port(),
        Transport::Tcp,
    );
    round_trip(&hub, "plain-1", options).await;
}

#[tokio::test]
async fn websocket_frames_may_split_and_join_packets() {
    use futures::{SinkExt, StreamExt};
    use iothub::mqtt::codec::{self, Connect, ConnectReturnCode, Packet as Wire, Publish};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let hub = TestHub::start().await;
    let key = primary_key(&hub.create_device("web-3").await);
    let url = format!("ws://{}/$iothub/websocket", hub.running().http_addr);
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "mqtt");

    let encode = |packet: Wire| {
        let mut out = bytes::BytesMut::new();
        codec::encode(&packet, &mut out);
        out.to_vec()
    };
    let mut connect = Connect::new("web-3");
    connect.set_login(user_name("web-3"), device_token("web-3", &key));
    let connect = encode(Wire::Connect(connect));
    // CONNECT in two frames, the second glued to a PUBLISH and a PINGREQ.
    let (head, tail) = connect.split_at(7);
    socket.send(Message::binary(head.to_vec())).await.unwrap();
    let mut publish = Publish::new(
        "devices/web-3/messages/events/",
        codec::QoS::AtLeastOnce,
        b"x".to_vec(),
    );
    publish.pkid = 5;
    let rest = [
        tail.to_vec(),
        encode(Wire::Publish(publish)),
        encode(Wire::PingReq),
    ]
    .concat();
    socket.send(Message::binary(rest)).await.unwrap();

    let mut received = bytes::BytesMut::new();
    let mut packets = Vec::new();
    while packets.len() < 3 {
        let frame = tokio::time::timeout(LIVENESS, socket.next())
            .await
            .expect("the hub answers")
            .expect("the socket stays open")
            .unwrap();
        received.extend_from_slice(&frame.into_data());
        while let Some(packet) = codec::decode(&mut received, 1 << 20).unwrap() {
            packets.push(packet);
        }
    }
    assert!(matches!(&packets[0], Wire::ConnAck(a) if a.code == ConnectReturnCode::Success));
    // PINGRESP may overtake the PUBACK, which waits for the commit.
    assert!(packets[1..]
        .iter()
        .any(|p| matches!(p, Wire::PubAck(a) if a.pkid == 5)));
    assert!(packets[1..].iter().any(|p| matches!(p, Wire::PingResp)));
}

#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_closed_after_the_write_timeout() {
    use futures::SinkExt;
    use iothub::mqtt::codec::{self, Connect, Packet as Wire};
    use rumqttc::mqttbytes::v4::{Subscribe, SubscribeFilter};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let hub = TestHub::start_with(|c| {
        c.mqtt.max_inflight = 100;
        c.mqtt.write_timeout_secs = 2;
        c.c2d.max_queue_depth = 1000;
    })
    .await;
    let key = primary_key(&hub.create_device("web-4").await);
    let addr = hub.running().http_addr;
    // A small receive buffer, so what the hub writes soon waits for the client.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut request = format!("ws://{addr}/$iothub/websocket")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let encode = |packet: Wire| {
        let mut out = bytes::BytesMut::new();
        codec::encode(&packet, &mut out);
        out.to_vec()
    };
    let mut connect = Connect::new("web-4");
    connect.keep_alive = 60;
    connect.set_login(user_name("web-4"), device_token("web-4", &key));
    let mut subscribe = Subscribe::new_many([SubscribeFilter::new(
        "devices/web-4/messages/devicebound/#".into(),
        codec::QoS::AtLeastOnce,
    )]);
    subscribe.pkid = 1;
    let hello = [
        encode(Wire::Connect(connect)),
        encode(Wire::Subscribe(subscribe)),
    ]
    .concat();
    socket.send(Message::binary(hello)).await.unwrap();
    // From here on the client reads nothing, while 6 MB of C2D messages are delivered to it.
    let service = hub.policy_token("service").await;
    for i in 0..110 {
        let response = hub
            .request(
                reqwest::Method::POST,
                &format!("{}/commands", device_path("web-4")),
                &service,
            )
            .body(format!("{i:04}{}", "x".repeat(60 * 1024)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let owner = hub.owner().await;
    wait_until("web-4 shown Disconnected", || async {
        let device: serde_json::Value = hub
            .request(reqwest::Method::GET, &device_path("web-4"), &owner)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        device["connectionState"] == "Disconnected"
    })
    .await;
    // The hub lets go of the WebSocket too: writing to it fails once the hub has closed the TCP connection.
    let raw = socket.get_mut();
    let closed = tokio::time::timeout(LIVENESS, async {
        loop {
            if raw.write_all(&[0u8; 1024]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the hub kept the WebSocket of a client that does not read"
    );
}
