//! A plain MQTT 3.1.1 client for the tests, on raw packets (the hub's own codec, which is rumqttc's): every byte
//! the hub sends is seen, in order, so a test can assert what did *not* come before something that did.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use iothub::mqtt::codec::{self, ConnAck, Connect, ConnectReturnCode, Packet, Publish, QoS};
use rumqttc::mqttbytes::v4::{PubAck, Subscribe, SubscribeFilter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{device_token, HOST, LIVENESS};

pub const API: &str = "api-version=2021-04-12";

/// The user name IoT Hub's SDKs send.
pub fn user_name(device: &str) -> String {
    format!("{HOST}/{device}/?{API}&DeviceClientType=iothub-tests")
}

pub struct Client {
    stream: TcpStream,
    buffer: BytesMut,
}

impl Client {
    pub async fn open(addr: SocketAddr) -> Client {
        Client::over(
            TcpStream::connect(addr)
                .await
                .expect("connect to the MQTT listener"),
        )
    }

    /// A client on a TCP connection the test opened (with its own socket options).
    pub fn over(stream: TcpStream) -> Client {
        Client {
            stream,
            buffer: BytesMut::new(),
        }
    }

    /// The connection, for a test that reads and writes on its own from here (nothing is left unread here).
    pub fn into_stream(self) -> TcpStream {
        assert!(self.buffer.is_empty(), "unread packets: {:?}", self.buffer);
        self.stream
    }

    /// A CONNECT of `device` with `token`, keep-alive 60 s.
    pub fn connect_packet(device: &str, token: &str) -> Connect {
        let mut connect = Connect::new(device);
        connect.keep_alive = 60;
        connect.set_login(user_name(device), token);
        connect
    }

    /// Connects as `device` with a token of `key`; asserts the CONNACK accepts.
    pub async fn connect(addr: SocketAddr, device: &str, key: &str) -> Client {
        Self::connect_with(addr, device, key, true).await.0
    }

    /// As [`Client::connect`] with the clean-session flag given; also returns CONNACK's session-present flag.
    pub async fn connect_with(
        addr: SocketAddr,
        device: &str,
        key: &str,
        clean_session: bool,
    ) -> (Client, bool) {
        let mut client = Client::open(addr).await;
        let mut connect = Connect::new(device);
        connect.clean_session = clean_session;
        connect.keep_alive = 60;
        connect.set_login(user_name(device), device_token(device, key));
        let ack = client.handshake(connect).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "CONNACK for {device}");
        (client, ack.session_present)
    }

    /// Sends `connect`; the CONNACK.
    pub async fn handshake(&mut self, connect: Connect) -> ConnAck {
        self.send(Packet::Connect(connect)).await;
        match self.recv().await {
            Some(Packet::ConnAck(ack)) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        codec::encode(&packet, &mut out);
        self.send_bytes(&out).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The hub may have closed already; the next read tells.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet; `None` when the hub closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        let read = async {
            loop {
                if let Some(packet) = codec::decode(&mut self.buffer, 1 << 20).expect("a packet") {
                    return Some(packet);
                }
                match self.stream.read_buf(&mut self.buffer).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(LIVENESS, read)
            .await
            .expect("the hub answers or closes")
    }

    /// Asserts the hub closes the connection (after whatever it still sends).
    pub async fn assert_closed(&mut self) {
        while let Some(packet) = self.recv().await {
            assert!(
                !matches!(packet, Packet::PubAck(_) | Packet::Publish(_)),
                "closing, the hub sent {packet:?}"
            );
        }
    }

    pub async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) {
        let mut publish = Publish::new(topic, qos, payload.to_vec());
        publish.pkid = pkid;
        self.send(Packet::Publish(publish)).await;
    }

    /// Publishes telemetry at QoS 1 and waits for its PUBACK.
    pub async fn send_event(&mut self, device: &str, bag: &str, pkid: u16, payload: &[u8]) {
        let topic = format!("devices/{device}/messages/events/{bag}");
        self.publish(&topic, QoS::AtLeastOnce, pkid, payload).await;
        match self.recv().await {
            Some(Packet::PubAck(ack)) => assert_eq!(ack.pkid, pkid),
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }

    /// Subscribes to `filters`; the SUBACK's return codes.
    pub async fn subscribe(
        &mut self,
        filters: &[&str],
    ) -> Vec<rumqttc::mqttbytes::v4::SubscribeReasonCode> {
        let filters = filters
            .iter()
            .map(|f| SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce))
            .collect::<Vec<_>>();
        let mut subscribe = Subscribe::new_many(filters);
        subscribe.pkid = 7;
        self.send(Packet::Subscribe(subscribe)).await;
        match self.recv().await {
            Some(Packet::SubAck(ack)) => {
                assert_eq!(ack.pkid, 7);
                ack.return_codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub async fn subscribe_c2d(&mut self, device: &str) {
        let codes = self
            .subscribe(&[&format!("devices/{device}/messages/devicebound/#")])
            .await;
        assert_eq!(
            codes,
            vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(
                QoS::AtLeastOnce
            )]
        );
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn next_publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(publish)) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    pub async fn puback(&mut self, pkid: u16) {
        self.send(Packet::PubAck(PubAck::new(pkid))).await;
    }

    /// PINGREQ, and asserts the next packet is its PINGRESP: everything the hub sent before is checked.
    pub async fn ping(&mut self) {
        self.send(Packet::PingReq).await;
        match self.recv().await {
            Some(Packet::PingResp) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}

/// The properties of a devicebound topic, decoded.
pub fn devicebound_properties(device: &str, topic: &str) -> Vec<(String, String)> {
    let prefix = format!("devices/{device}/messages/devicebound/");
    let bag = topic
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("a devicebound topic: {topic}"));
    iothub::mqtt::properties::parse(bag).expect("a property bag")
}

pub fn property<'p>(properties: &'p [(String, String)], name: &str) -> Option<&'p str> {
    properties
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A short pause for the hub's side of a connection that ended to be written (registry state); tests use
/// `wait_until` on what they check, this is only for loops.
pub const STEP: Duration = Duration::from_millis(20);
