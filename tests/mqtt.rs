//! The MQTT device endpoint with a plain MQTT client: CONNECT and its refusals, telemetry at QoS 0 and 1, C2D
//! delivery and acknowledgement, sessions, take-over, and the topics the hub does not serve.

mod common;

use bytes::BytesMut;
use common::mqtt::{devicebound_properties, property, user_name, Client};
use common::*;
use iothub::mqtt::codec::{self, Connect, ConnectReturnCode, Packet, Protocol, QoS};
use reqwest::Method;
use rumqttc::mqttbytes::v4::SubscribeReasonCode;
use serde_json::Value;

struct Mqtt {
    hub: TestHub,
    service: String,
}

impl Mqtt {
    async fn start() -> Mqtt {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut iothub::Config)) -> Mqtt {
        let hub = TestHub::start_with(adjust).await;
        let service = hub.policy_token("service").await;
        Mqtt { hub, service }
    }

    /// Registers a device; its primary key.
    async fn device(&self, id: &str) -> String {
        primary_key(&self.hub.create_device(id).await)
    }

    async fn connect(&self, id: &str, key: &str) -> Client {
        Client::connect(self.hub.mqtt_addr(), id, key).await
    }

    /// Enqueues a C2D message over REST; its sequence number.
    async fn enqueue(&self, id: &str, headers: &[(&str, &str)], body: &str) -> i64 {
        let mut request = self
            .hub
            .request(
                Method::POST,
                &format!("{}/commands", device_path(id)),
                &self.service,
            )
            .body(body.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 201);
        let answer: Value = response.json().await.unwrap();
        answer["sequenceNumber"].as_i64().unwrap()
    }

    async fn status(&self, id: &str, seq: i64) -> Value {
        self.hub
            .request(
                Method::GET,
                &format!("{}/commands/{seq}", device_path(id)),
                &self.service,
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_for_state(&self, id: &str, seq: i64, state: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..3000 {
            last = self.status(id, seq).await;
            if last["state"] == state {
                return last;
            }
            tokio::time::sleep(common::mqtt::STEP).await;
        }
        panic!("message {seq} never reached {state}: {last}");
    }

    async fn registry(&self, id: &str) -> Value {
        let owner = self.hub.owner().await;
        self.hub
            .request(Method::GET, &device_path(id), &owner)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_for_connection_state(&self, id: &str, state: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..3000 {
            last = self.registry(id).await;
            if last["connectionState"] == state {
                return last;
            }
            tokio::time::sleep(common::mqtt::STEP).await;
        }
        panic!("{id} never became {state}: {last}");
    }

    async fn events_of(&self, id: &str) -> Vec<Value> {
        self.hub
            .events()
            .await
            .into_iter()
            .filter(|e| e["deviceId"] == id)
            .collect()
    }
}

fn connect_packet(device: &str, user: Option<(&str, &str)>) -> Connect {
    let mut connect = Connect::new(device);
    if let Some((user, password)) = user {
        connect.set_login(user, password);
    }
    connect
}

async fn refused(t: &Mqtt, connect: Connect) -> ConnectReturnCode {
    let mut client = Client::open(t.hub.mqtt_addr()).await;
    let ack = client.handshake(connect).await;
    assert!(!ack.session_present);
    client.assert_closed().await;
    ack.code
}

#[tokio::test]
async fn telemetry_at_qos_1_is_acknowledged_after_commit_with_its_properties() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let mut client = t.connect("dev-1", &key).await;

    let bag = "%24.mid=m-1&%24.cid=c-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high&room-name=lab%201";
    client.send_event("dev-1", bag, 1, br#"{"t":21.5}"#).await;
    // The PUBACK came: the message is committed, readable at once.
    let events = t.events_of("dev-1").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    let system = &event["systemProperties"];
    assert_eq!(system["iothub-messageid"], "m-1");
    assert_eq!(system["iothub-correlationid"], "c-1");
    assert_eq!(system["iothub-contenttype"], "application/json");
    assert_eq!(system["iothub-contentencoding"], "utf-8");
    assert_eq!(system["iothub-connection-device-id"], "dev-1");
    assert_eq!(system["iothub-message-source"], "Telemetry");
    assert!(system["iothub-connection-auth-method"]
        .as_str()
        .unwrap()
        .contains("\"device\""));
    assert_eq!(event["properties"]["alert"], "high");
    assert_eq!(event["properties"]["room-name"], "lab 1");
    assert_eq!(event["bodyJson"]["t"], 21.5);

    // The topic without a trailing slash, and an empty bag, are IoT Hub's too.
    client.send_event("dev-1", "", 2, b"x").await;
    let topic = "devices/dev-1/messages/events";
    client.publish(topic, QoS::AtLeastOnce, 3, b"y").await;
    assert!(matches!(client.recv().await, Some(Packet::PubAck(a)) if a.pkid == 3));
    assert_eq!(t.events_of("dev-1").await.len(), 3);
}

#[tokio::test]
async fn telemetry_at_qos_0_is_stored_without_puback() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let mut client = t.connect("dev-1", &key).await;
    for i in 0..5u8 {
        client
            .publish(
                "devices/dev-1/messages/events/",
                QoS::AtMostOnce,
                0,
                &[b'0' + i],
            )
            .await;
    }
    // PINGRESP is the next packet: no PUBACK came for QoS 0.
    client.ping().await;
    wait_until("five QoS 0 messages stored", || async {
        t.events_of("dev-1").await.len() == 5
    })
    .await;
}

#[tokio::test]
async fn connect_refusals_have_their_return_codes() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let other_key = t.device("dev-2").await;
    let user = user_name("dev-1");
    let token = device_token("dev-1", &key);

    // Wrong key, another device's token, a token for another hub: not authorized (0x05).
    let wrong = device_token("dev-1", &other_key);
    assert_eq!(
        refused(&t, connect_packet("dev-1", Some((&user, &wrong)))).await,
        ConnectReturnCode::NotAuthorized
    );
    let dev2 = device_token("dev-2", &other_key);
    assert_eq!(
        refused(&t, connect_packet("dev-1", Some((&user, &dev2)))).await,
        ConnectReturnCode::NotAuthorized
    );
    let elsewhere =
        iothub::auth::sas::sign("elsewhere.example/devices/dev-1", &key, None, now() + 3600)
            .unwrap();
    assert_eq!(
        refused(&t, connect_packet("dev-1", Some((&user, &elsewhere)))).await,
        ConnectReturnCode::NotAuthorized
    );
    // Expired token.
    let expired =
        iothub::auth::sas::sign(&format!("{HOST}/devices/dev-1"), &key, None, now() - 3600)
            .unwrap();
    assert_eq!(
        refused(&t, connect_packet("dev-1", Some((&user, &expired)))).await,
        ConnectReturnCode::NotAuthorized
    );
    // An unknown device.
    let ghost = device_token("ghost", &key);
    assert_eq!(
        refused(
            &t,
            connect_packet("ghost", Some((&user_name("ghost"), &ghost)))
        )
        .await,
        ConnectReturnCode::NotAuthorized
    );
    // A policy without DeviceConnect; one with it connects.
    let registry_read = t.hub.policy_token("registryRead").await;
    assert_eq!(
        refused(&t, connect_packet("dev-1", Some((&user, &registry_read)))).await,
        ConnectReturnCode::NotAuthorized
    );
    let device_policy = t.hub.policy_token("device").await;
    let mut client = Client::open(t.hub.mqtt_addr()).await;
    let ack = client
        .handshake(connect_packet("dev-1", Some((&user, &device_policy))))
        .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    drop(client);

    // Missing or malformed credentials, or a user name naming another device: 0x04.
    assert_eq!(
        refused(&t, connect_packet("dev-1", None)).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused(&t, connect_packet("dev-1", Some((&user, "not a token")))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused(
            &t,
            connect_packet("dev-1", Some((&user_name("dev-2"), &token)))
        )
        .await,
        ConnectReturnCode::BadUserNamePassword
    );
    // A client id that is no device id: 0x02.
    assert_eq!(
        refused(&t, connect_packet("dev/1", Some((&user, &token)))).await,
        ConnectReturnCode::BadClientId
    );
    assert_eq!(
        refused(&t, connect_packet("", Some((&user, &token)))).await,
        ConnectReturnCode::BadClientId
    );
    // MQTT 5: 0x01.
    let mut v5 = connect_packet("dev-1", Some((&user, &token)));
    v5.protocol = Protocol::V5;
    assert_eq!(
        refused(&t, v5).await,
        ConnectReturnCode::RefusedProtocolVersion
    );

    // A disabled device.
    t.hub.disable_device("dev-1").await;
    wait_until("the disabled device is refused", || async {
        let mut client = Client::open(t.hub.mqtt_addr()).await;
        client
            .handshake(connect_packet("dev-1", Some((&user, &token))))
            .await
            .code
            == ConnectReturnCode::NotAuthorized
    })
    .await;
}

#[tokio::test]
async fn mqtt_3_1_is_refused_with_0x01() {
    let t = Mqtt::start().await;
    // CONNECT of MQTT 3.1: protocol name "MQIsdp", level 3.
    let mut bytes = vec![0x10u8, 0];
    let body: Vec<u8> = [&[0, 6][..], b"MQIsdp", &[3, 0x02, 0, 60], &[0, 5], b"dev-1"].concat();
    bytes[1] = body.len() as u8;
    bytes.extend(body);
    let mut client = Client::open(t.hub.mqtt_addr()).await;
    client.send_bytes(&bytes).await;
    match client.recv().await {
        Some(Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, ConnectReturnCode::RefusedProtocolVersion)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    client.assert_closed().await;
}

#[tokio::test]
async fn no_packet_is_served_before_connect() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    t.enqueue("dev-1", &[], "secret").await;
    let mut client = Client::open(t.hub.mqtt_addr()).await;
    client
        .publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, 1, b"x")
        .await;
    client.assert_closed().await;
    let mut client = Client::open(t.hub.mqtt_addr()).await;
    let mut ping_first = BytesMut::new();
    codec::encode(&Packet::PingReq, &mut ping_first);
    client.send_bytes(&ping_first).await;
    client.assert_closed().await;
    assert!(t.events_of("dev-1").await.is_empty());
    // A proper connection still works.
    let mut client = t.connect("dev-1", &key).await;
    client.ping().await;
}

#[tokio::test]
async fn refused_publishes_close_the_connection_and_store_nothing() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    t.device("dev-2").await;
    let oversized = vec![b'x'; 262_145];
    let long_topic = format!("devices/dev-1/messages/events/a={}", "b".repeat(16 * 1024));
    let many_properties = format!(
        "devices/dev-1/messages/events/{}",
        (0..129)
            .map(|i| format!("p{i}=v"))
            .collect::<Vec<_>>()
            .join("&")
    );
    let cases: Vec<(&str, QoS, &[u8])> = vec![
        ("devices/dev-2/messages/events/", QoS::AtLeastOnce, b"x"),
        ("devices/dev-1/messages/other/", QoS::AtLeastOnce, b"x"),
        ("sensors/temperature", QoS::AtMostOnce, b"x"),
        ("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, b""),
        ("$iothub/methods/res/200/?$rid=1", QoS::AtMostOnce, b""),
        ("devices/dev-1/messages/events/", QoS::ExactlyOnce, b"x"),
        (
            "devices/dev-1/messages/events/bad%20name=1",
            QoS::AtLeastOnce,
            b"x",
        ),
        (
            "devices/dev-1/messages/events/a=%FF",
            QoS::AtLeastOnce,
            b"x",
        ),
        (
            "devices/dev-1/messages/events/%24.mid=no%2Fslash",
            QoS::AtLeastOnce,
            b"x",
        ),
        (
            "devices/dev-1/messages/events/",
            QoS::AtLeastOnce,
            &oversized,
        ),
        (&long_topic, QoS::AtLeastOnce, b"x"),
        (&many_properties, QoS::AtLeastOnce, b"x"),
    ];
    for (topic, qos, payload) in cases {
        let mut client = t.connect("dev-1", &key).await;
        client.publish(topic, qos, 1, payload).await;
        client.assert_closed().await;
    }
    // A packet whose header promises more than the hub takes is refused before its body arrives.
    let mut client = t.connect("dev-1", &key).await;
    client.send_bytes(&[0x32, 0xff, 0xff, 0xff, 0x7f]).await;
    client.assert_closed().await;
    // Bytes that are no packet.
    let mut client = t.connect("dev-1", &key).await;
    client.send_bytes(&[0xf0, 0x00]).await;
    client.assert_closed().await;
    assert!(t.events_of("dev-1").await.is_empty());
    assert!(t.events_of("dev-2").await.is_empty());
}

#[tokio::test]
async fn twin_and_method_subscriptions_fail_without_closing() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let mut client = t.connect("dev-1", &key).await;
    let codes = client
        .subscribe(&[
            "$iothub/twin/res/#",
            "devices/dev-1/messages/devicebound/#",
            "$iothub/methods/POST/#",
            "devices/dev-2/messages/devicebound/#",
        ])
        .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
        ]
    );
    client.ping().await;
    // Too many filters at once: closed.
    let many: Vec<String> = (0..9).map(|i| format!("x/{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let filters = many
        .iter()
        .map(|f| rumqttc::mqttbytes::v4::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce))
        .collect::<Vec<_>>();
    let mut subscribe = rumqttc::mqttbytes::v4::Subscribe::new_many(filters);
    subscribe.pkid = 9;
    client.send(Packet::Subscribe(subscribe)).await;
    client.assert_closed().await;
}

#[tokio::test]
async fn c2d_messages_are_delivered_with_their_properties_and_completed_by_puback() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let early = t
        .enqueue(
            "dev-1",
            &[
                ("iothub-messageid", "m-1"),
                ("iothub-correlationid", "c-1"),
                ("iothub-ack", "full"),
                ("iothub-app-colour", "dark blue"),
                ("content-type", "text/plain"),
            ],
            "first",
        )
        .await;
    let mut client = t.connect("dev-1", &key).await;
    client.subscribe_c2d("dev-1").await;
    let publish = client.next_publish().await;
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    assert!(!publish.dup);
    assert_eq!(&publish.payload[..], b"first");
    let properties = devicebound_properties("dev-1", &publish.topic);
    assert_eq!(property(&properties, "$.mid"), Some("m-1"));
    assert_eq!(property(&properties, "$.cid"), Some("c-1"));
    assert_eq!(
        property(&properties, "$.to"),
        Some("/devices/dev-1/messages/devicebound")
    );
    assert_eq!(property(&properties, "iothub-ack"), Some("full"));
    assert_eq!(property(&properties, "colour"), Some("dark blue"));
    assert_eq!(t.status("dev-1", early).await["state"], "Invisible");

    client.puback(publish.pkid).await;
    let status = t.wait_for_state("dev-1", early, "Completed").await;
    assert_eq!(status["outcome"], "Success");

    // A message enqueued while the device is subscribed arrives without any request (notification).
    let late = t
        .enqueue("dev-1", &[("iothub-messageid", "m-2")], "second")
        .await;
    let publish = client.next_publish().await;
    assert_eq!(&publish.payload[..], b"second");
    client.puback(publish.pkid).await;
    t.wait_for_state("dev-1", late, "Completed").await;

    // Feedback `Success` for the message that asked for it.
    let feedback = t
        .hub
        .request(Method::GET, "/messages/serviceBound/feedback", &t.service)
        .send()
        .await
        .unwrap();
    assert_eq!(feedback.status(), 200);
    let records: Vec<Value> = feedback.json().await.unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["originalMessageId"], "m-1");
    assert_eq!(records[0]["statusCode"], "Success");
}

#[tokio::test]
async fn in_flight_deliveries_are_bounded() {
    let t = Mqtt::start_with(|c| c.mqtt.max_inflight = 2).await;
    let key = t.device("dev-1").await;
    for i in 0..5 {
        t.enqueue("dev-1", &[], &format!("m{i}")).await;
    }
    let mut client = t.connect("dev-1", &key).await;
    client.subscribe_c2d("dev-1").await;
    let first = client.next_publish().await;
    let second = client.next_publish().await;
    // Two unacknowledged: nothing more until a PUBACK.
    client.ping().await;
    client.puback(first.pkid).await;
    let third = client.next_publish().await;
    assert_eq!(&third.payload[..], b"m2");
    client.ping().await;
    client.puback(second.pkid).await;
    client.puback(third.pkid).await;
    let fourth = client.next_publish().await;
    let fifth = client.next_publish().await;
    assert_eq!(
        (&fourth.payload[..], &fifth.payload[..]),
        (&b"m3"[..], &b"m4"[..])
    );
}

#[tokio::test]
async fn a_dropped_connection_makes_its_deliveries_deliverable_again_with_dup() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let seq = t.enqueue("dev-1", &[], "again").await;
    let mut client = t.connect("dev-1", &key).await;
    client.subscribe_c2d("dev-1").await;
    let publish = client.next_publish().await;
    assert!(!publish.dup);
    drop(client);
    t.wait_for_state("dev-1", seq, "Enqueued").await;

    let mut client = t.connect("dev-1", &key).await;
    client.subscribe_c2d("dev-1").await;
    let again = client.next_publish().await;
    assert!(again.dup, "a redelivery has DUP set");
    assert_eq!(&again.payload[..], b"again");
    assert_eq!(t.status("dev-1", seq).await["deliveryCount"], 2);
    client.puback(again.pkid).await;
    t.wait_for_state("dev-1", seq, "Completed").await;
}

#[tokio::test]
async fn a_lock_that_runs_out_without_puback_redelivers_on_the_same_connection() {
    let t = Mqtt::start_with(|c| c.c2d.lock_secs = 5).await;
    let key = t.device("dev-1").await;
    let seq = t.enqueue("dev-1", &[], "slow").await;
    let mut client = t.connect("dev-1", &key).await;
    client.subscribe_c2d("dev-1").await;
    let first = client.next_publish().await;
    // No PUBACK: after the lock (5 s) the message comes again, flagged as a redelivery.
    let again = client.next_publish().await;
    assert!(again.dup);
    assert_eq!(&again.payload[..], b"slow");
    // The first delivery's late PUBACK settles nothing; the current one completes it.
    client.puback(first.pkid).await;
    client.ping().await;
    assert_eq!(t.status("dev-1", seq).await["state"], "Invisible");
    client.puback(again.pkid).await;
    t.wait_for_state("dev-1", seq, "Completed").await;
}

#[tokio::test]
async fn deliveries_past_the_maximum_count_are_dead_lettered_with_feedback() {
    let t = Mqtt::start_with(|c| c.c2d.max_delivery_count = 2).await;
    let key = t.device("dev-1").await;
    let seq = t
        .enqueue(
            "dev-1",
            &[("iothub-ack", "negative"), ("iothub-messageid", "dl")],
            "x",
        )
        .await;
    for _ in 0..2 {
        let mut client = t.connect("dev-1", &key).await;
        client.subscribe_c2d("dev-1").await;
        client.next_publish().await;
        drop(client);
        wait_until("the lease released", || async {
            t.status("dev-1", seq).await["state"] != "Invisible"
        })
        .await;
    }
    let status = t.wait_for_state("dev-1", seq, "DeadLettered").await;
    assert_eq!(status["outcome"], "DeliveryCountExceeded");
    let mut client = t.connect("dev-1", &key).await;
    client.subscribe_c2d("dev-1").await;
    client.ping().await;
    let records: Vec<Value> = t
        .hub
        .request(Method::GET, "/messages/serviceBound/feedback", &t.service)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(records[0]["originalMessageId"], "dl");
    assert_eq!(records[0]["statusCode"], "DeliveryCountExceeded");
}

#[tokio::test]
async fn expired_messages_are_not_delivered_but_dead_lettered() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let expired = t
        .enqueue(
            "dev-1",
            &[("iothub-ttl", "1"), ("iothub-ack", "full")],
            "late",
        )
        .await;
    let fresh = t.enqueue("dev-1", &[], "fresh").await;
    let expires = api_time(&t.status("dev-1", expired).await["expiryTimeUtc"]);
    wait_for_db_time(&t.hub.db, expires).await;
    let mut client = t.connect("dev-1", &key).await;
    client.subscribe_c2d("dev-1").await;
    let publish = client.next_publish().await;
    assert_eq!(&publish.payload[..], b"fresh");
    client.puback(publish.pkid).await;
    t.wait_for_state("dev-1", fresh, "Completed").await;
    let status = t.wait_for_state("dev-1", expired, "DeadLettered").await;
    assert_eq!(status["outcome"], "Expired");
}

#[tokio::test]
async fn a_persistent_session_keeps_the_c2d_subscription_and_a_clean_one_does_not() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let addr = t.hub.mqtt_addr();
    let (mut client, present) = Client::connect_with(addr, "dev-1", &key, false).await;
    assert!(!present);
    client.subscribe_c2d("dev-1").await;
    client.send(Packet::Disconnect).await;
    client.assert_closed().await;

    t.enqueue("dev-1", &[], "kept").await;
    let (mut client, present) = Client::connect_with(addr, "dev-1", &key, false).await;
    assert!(present, "the session is present");
    let publish = client.next_publish().await;
    assert_eq!(&publish.payload[..], b"kept");
    client.puback(publish.pkid).await;
    client.send(Packet::Disconnect).await;
    client.assert_closed().await;

    // A clean session forgets it: nothing is delivered without a SUBSCRIBE.
    t.enqueue("dev-1", &[], "waits").await;
    let (mut client, present) = Client::connect_with(addr, "dev-1", &key, true).await;
    assert!(!present);
    client.ping().await;
    client.send(Packet::Disconnect).await;
    client.assert_closed().await;
    let (mut client, present) = Client::connect_with(addr, "dev-1", &key, false).await;
    assert!(!present, "the clean session ended the stored one");
    client.ping().await;
    client.subscribe_c2d("dev-1").await;
    assert_eq!(&client.next_publish().await.payload[..], b"waits");
}

#[tokio::test]
async fn a_second_connection_takes_over_and_the_registry_shows_the_state() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let before = t.registry("dev-1").await;
    assert_eq!(before["connectionState"], "Disconnected");

    let mut first = t.connect("dev-1", &key).await;
    let connected = t.wait_for_connection_state("dev-1", "Connected").await;
    let connected_at = api_time(&connected["connectionStateUpdatedTime"]);
    let active_at = api_time(&connected["lastActivityTime"]);
    assert!(active_at >= connected_at - chrono::Duration::seconds(1));
    let owner = t.hub.owner().await;
    let stats: Value = t
        .hub
        .request(Method::GET, "/statistics/service", &owner)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["connectedDeviceCount"], 1);
    let metrics = t
        .hub
        .http
        .get(format!("{}/metrics", t.hub.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("iothub_mqtt_connected_devices"),
        "{metrics}"
    );

    let mut second = t.connect("dev-1", &key).await;
    first.assert_closed().await;
    second.ping().await;
    assert_eq!(t.registry("dev-1").await["connectionState"], "Connected");
    second.send(Packet::Disconnect).await;
    second.assert_closed().await;
    t.wait_for_connection_state("dev-1", "Disconnected").await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_one_and_a_half_keep_alives() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let mut client = Client::open(t.hub.mqtt_addr()).await;
    let mut connect = connect_packet(
        "dev-1",
        Some((&user_name("dev-1"), &device_token("dev-1", &key))),
    );
    connect.keep_alive = 1;
    assert_eq!(
        client.handshake(connect).await.code,
        ConnectReturnCode::Success
    );
    client.assert_closed().await;
    t.wait_for_connection_state("dev-1", "Disconnected").await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_as_unavailable() {
    let t = Mqtt::start_with(|c| c.mqtt.max_connections = 1).await;
    let key = t.device("dev-1").await;
    let key2 = t.device("dev-2").await;
    let mut first = t.connect("dev-1", &key).await;
    let mut second = Client::open(t.hub.mqtt_addr()).await;
    let ack = second
        .handshake(connect_packet(
            "dev-2",
            Some((&user_name("dev-2"), &device_token("dev-2", &key2))),
        ))
        .await;
    assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable);
    second.assert_closed().await;
    first.ping().await;
    drop(first);
    wait_until("the first connection's place is free", || async {
        t.hub.running().mqtt_connections() == 0
    })
    .await;
    let mut again = Client::connect(t.hub.mqtt_addr(), "dev-2", &key2).await;
    again.ping().await;
}

#[tokio::test]
async fn telemetry_over_the_throttle_rate_is_delayed_not_refused() {
    // Two messages per second per device (a bucket of two): five take at least 1.5 s, and none is refused.
    let t = Mqtt::start_with(|c| c.throttle.device_d2c_send = Some(2.0)).await;
    let key = t.device("dev-1").await;
    let mut client = t.connect("dev-1", &key).await;
    let started = std::time::Instant::now();
    for pkid in 1..=5 {
        client.send_event("dev-1", "", pkid, b"x").await;
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "the rate held back the later messages"
    );
    assert_eq!(t.events_of("dev-1").await.len(), 5);
}

#[tokio::test]
async fn a_last_will_is_stored_as_telemetry_when_the_device_drops_without_disconnect() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let token = device_token("dev-1", &key);
    let with_will = |mid: &str| {
        let mut connect = connect_packet("dev-1", Some((&user_name("dev-1"), &token)));
        connect.last_will = Some(rumqttc::mqttbytes::v4::LastWill::new(
            format!("devices/dev-1/messages/events/%24.mid={mid}&cause=lost"),
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        connect
    };
    // Said goodbye: no will.
    let mut polite = Client::open(t.hub.mqtt_addr()).await;
    assert_eq!(
        polite.handshake(with_will("polite")).await.code,
        ConnectReturnCode::Success
    );
    polite.send(Packet::Disconnect).await;
    polite.assert_closed().await;
    t.wait_for_connection_state("dev-1", "Disconnected").await;
    // Dropped: the will is stored.
    let mut rude = Client::open(t.hub.mqtt_addr()).await;
    assert_eq!(
        rude.handshake(with_will("rude")).await.code,
        ConnectReturnCode::Success
    );
    drop(rude);
    t.wait_for_connection_state("dev-1", "Disconnected").await;
    let events = t.events_of("dev-1").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["systemProperties"]["iothub-messageid"], "rude");
    assert_eq!(events[0]["properties"]["iothub-MessageType"], "Will");
    assert_eq!(events[0]["properties"]["cause"], "lost");
}

#[tokio::test]
async fn a_qos_0_subscription_gets_c2d_at_most_once() {
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    let seqs = [
        t.enqueue("dev-1", &[], "one").await,
        t.enqueue("dev-1", &[], "two").await,
    ];
    let mut client = t.connect("dev-1", &key).await;
    let filter = "devices/dev-1/messages/devicebound/#";
    let mut subscribe = rumqttc::mqttbytes::v4::Subscribe::new(filter, QoS::AtMostOnce);
    subscribe.pkid = 3;
    client.send(Packet::Subscribe(subscribe)).await;
    match client.recv().await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(
                ack.return_codes,
                vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
            )
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    for body in ["one", "two"] {
        let publish = client.next_publish().await;
        assert_eq!(publish.qos, QoS::AtMostOnce);
        assert_eq!(&publish.payload[..], body.as_bytes());
    }
    // Written at QoS 0 means delivered: completed without a PUBACK.
    for seq in seqs {
        let status = t.wait_for_state("dev-1", seq, "Completed").await;
        assert_eq!(status["outcome"], "Success");
    }
}

#[tokio::test]
async fn a_client_that_never_sends_connect_is_dropped() {
    let t = Mqtt::start().await;
    // Connected, silent: closed after the CONNECT timeout (10 s), without an answer.
    let mut silent = Client::open(t.hub.mqtt_addr()).await;
    // Half a CONNECT: the same.
    let mut slow = Client::open(t.hub.mqtt_addr()).await;
    slow.send_bytes(&[0x10, 0x20, 0x00]).await;
    silent.assert_closed().await;
    slow.assert_closed().await;
    wait_until("no connection left open", || async {
        t.hub.running().mqtt_connections() == 0
    })
    .await;
}

#[tokio::test]
async fn disabling_or_deleting_a_connected_device_closes_its_connection() {
    let t = Mqtt::start().await;
    let key1 = t.device("dev-1").await;
    let key2 = t.device("dev-2").await;
    let mut one = t.connect("dev-1", &key1).await;
    let mut two = t.connect("dev-2", &key2).await;
    t.hub.disable_device("dev-1").await;
    one.assert_closed().await;
    t.wait_for_connection_state("dev-1", "Disconnected").await;
    two.ping().await;
    let owner = t.hub.owner().await;
    let deleted = t
        .hub
        .request(Method::DELETE, &device_path("dev-2"), &owner)
        .header("If-Match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    two.assert_closed().await;
}

#[tokio::test]
async fn a_connection_ends_when_the_token_it_connected_with_expires() {
    use iothub::auth::sas::{self, EXPIRY_SKEW_SECS};
    let t = Mqtt::start().await;
    let key = t.device("dev-1").await;
    // Valid for 3 s more on the database's clock, the hub's tolerance for clock skew included.
    let expiry = t.hub.db_now().await.timestamp() + 3 - EXPIRY_SKEW_SECS;
    let token = sas::sign(&format!("{HOST}/devices/dev-1"), &key, None, expiry).unwrap();
    let mut client = Client::open(t.hub.mqtt_addr()).await;
    let ack = client
        .handshake(Client::connect_packet("dev-1", &token))
        .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    // Served while the token is valid (the database's clock decides, as for every time rule)...
    let valid_until = chrono::DateTime::from_timestamp(expiry + EXPIRY_SKEW_SECS, 0).unwrap();
    let mut pings = 0;
    while t.hub.db_now().await < valid_until - chrono::Duration::milliseconds(500) {
        client.ping().await;
        pings += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        pings > 0,
        "the connection was served before the token expired"
    );
    // ...and closed once it has expired, well before the keep-alive (90 s) would end it.
    client.assert_closed().await;
    assert!(t.hub.db_now().await >= valid_until);
    t.wait_for_connection_state("dev-1", "Disconnected").await;
    // A fresh token connects again, as the SDKs do before the old one expires.
    let mut again = t.connect("dev-1", &key).await;
    again.ping().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_its_deliveries_come_back() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    // Enough in flight that the C2D bodies (6 MB) overfill the hub's socket buffers (Linux grows them to a few MB).
    const INFLIGHT: i64 = 100;
    const QUEUED: i64 = INFLIGHT + 10;
    const TIMEOUT_SECS: u64 = 2;
    let t = Mqtt::start_with(|c| {
        c.mqtt.max_inflight = INFLIGHT as u32;
        c.mqtt.write_timeout_secs = TIMEOUT_SECS;
        c.c2d.max_queue_depth = 1000;
    })
    .await;
    let key = t.device("stuck").await;
    let other_key = t.device("other").await;
    // A small receive buffer, so what the hub writes soon waits for the client.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(t.hub.mqtt_addr()).await.unwrap();
    let mut client = Client::over(stream);
    let token = device_token("stuck", &key);
    let ack = client
        .handshake(Client::connect_packet("stuck", &token))
        .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    client.subscribe_c2d("stuck").await;
    // From here on the client reads nothing.
    let stopped_reading = std::time::Instant::now();
    let (_unread, mut writer) = client.into_stream().into_split();

    // The most messages of the device locked at once, sampled until the end.
    let most_locked = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (db, most_locked, done) = (t.hub.db.clone(), most_locked.clone(), done.clone());
        async move {
            while !done.load(Ordering::Relaxed) {
                let locked: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM c2d_messages WHERE device_id = 'stuck' AND state = 'invisible'",
                )
                .fetch_one(&db)
                .await
                .unwrap();
                most_locked.fetch_max(locked, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    });
    // Telemetry whose PUBACKs are never read, written until the hub stops taking it or closes.
    let publisher = tokio::spawn(async move {
        let mut sent = 0usize;
        for pkid in (1..=u16::MAX).cycle() {
            let mut publish = codec::Publish::new(
                "devices/stuck/messages/events/",
                QoS::AtLeastOnce,
                vec![7u8; 1024],
            );
            publish.pkid = pkid;
            let mut bytes = BytesMut::new();
            codec::encode(&Packet::Publish(publish), &mut bytes);
            match tokio::time::timeout(LIVENESS, writer.write_all(&bytes)).await {
                Ok(Ok(())) => sent += bytes.len(),
                _ => break,
            }
        }
        sent
    });
    let mut seqs = Vec::new();
    for i in 0..QUEUED {
        let body = format!("{i:04}{}", "x".repeat(60 * 1024));
        seqs.push(t.enqueue("stuck", &[], &body).await);
    }

    // Another device is served meanwhile.
    let mut other = t.connect("other", &other_key).await;
    other.send_event("other", "", 1, b"meanwhile").await;
    let other_seq = t.enqueue("other", &[], "for other").await;
    other.subscribe_c2d("other").await;
    let delivered = other.next_publish().await;
    assert_eq!(&delivered.payload[..], b"for other");
    other.puback(delivered.pkid).await;
    t.wait_for_state("other", other_seq, "Completed").await;

    t.wait_for_connection_state("stuck", "Disconnected").await;
    let closed_after = stopped_reading.elapsed();
    let sent = tokio::time::timeout(LIVENESS, publisher)
        .await
        .expect("the client's writes end once the hub closed")
        .unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let most_locked = most_locked.load(Ordering::Relaxed);
    eprintln!(
        "closed {closed_after:?} after the client stopped reading; it wrote {sent} bytes of telemetry; \
         at most {most_locked} C2D messages locked at once"
    );
    // Closed by the write timeout (the keep-alive is 90 s, the default write timeout 30 s).
    assert!(
        closed_after < std::time::Duration::from_secs(TIMEOUT_SECS + 15),
        "closed after {closed_after:?}"
    );
    assert!(
        (1..=INFLIGHT).contains(&most_locked),
        "{most_locked} locked at once"
    );
    // The hub stopped reading while its writes waited: what the client got in is bounded by the pending bound and
    // the socket buffers (Linux grows them up to 4 MB for sending, 32 MB for receiving), not by how long it wrote.
    assert!(sent < 64 << 20, "the client wrote {sent} bytes");

    // What it never acknowledged is deliverable again, its delivery counted.
    let mut deliveries = Vec::new();
    for &seq in &seqs {
        let status = t.status("stuck", seq).await;
        assert_eq!(status["state"], "Enqueued", "{status}");
        deliveries.push(status["deliveryCount"].as_i64().unwrap());
    }
    let delivered_once = deliveries.iter().filter(|&&n| n == 1).count() as i64;
    assert!(
        (1..=INFLIGHT).contains(&delivered_once),
        "{delivered_once} delivered"
    );
    // A device that reads gets every message, the ones delivered before flagged DUP, and completes them.
    let mut back = t.connect("stuck", &key).await;
    back.subscribe_c2d("stuck").await;
    for _ in 0..QUEUED {
        let publish = back.next_publish().await;
        let index: usize = std::str::from_utf8(&publish.payload[..4])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(publish.dup, deliveries[index] > 0, "DUP of message {index}");
        back.puback(publish.pkid).await;
    }
    for (index, &seq) in seqs.iter().enumerate() {
        let completed = t.wait_for_state("stuck", seq, "Completed").await;
        assert_eq!(
            completed["deliveryCount"],
            deliveries[index] + 1,
            "{completed}"
        );
    }
}
