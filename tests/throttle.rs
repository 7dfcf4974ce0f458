//! Throttling over HTTP: none by default; a configured or tier limit answers 429 (429001) with Retry-After.

mod common;

use std::time::Duration;

use common::*;
use iothub::throttle::{ThrottleConfig, Tier};
use reqwest::Method;

/// The operation classes IoT Hub throttles separately, each with one of its routes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Class {
    Registry,
    D2cSend,
    C2dSend,
    C2dReceive,
}

const CLASSES: [Class; 4] = [
    Class::Registry,
    Class::D2cSend,
    Class::C2dSend,
    Class::C2dReceive,
];

/// A rate that allows one request and then none for 100 s: the second request of a class is always throttled.
const ONE_THEN_NONE: f64 = 0.01;

impl Class {
    /// Limits this class hub-wide, or per device.
    fn limit(self, throttle: &mut ThrottleConfig, per_device: bool) {
        let slot = match (self, per_device) {
            (Class::Registry, _) => &mut throttle.registry,
            (Class::D2cSend, false) => &mut throttle.d2c_send,
            (Class::C2dSend, false) => &mut throttle.c2d_send,
            (Class::C2dReceive, false) => &mut throttle.c2d_receive,
            (Class::D2cSend, true) => &mut throttle.device_d2c_send,
            (Class::C2dSend, true) => &mut throttle.device_c2d_send,
            (Class::C2dReceive, true) => &mut throttle.device_c2d_receive,
        };
        *slot = Some(ONE_THEN_NONE);
    }

    /// One request of this class about device `id`: the registry read of the device, a telemetry send, a C2D send
    /// by the service, a C2D receive by the device.
    async fn call(self, hub: &TestHub, id: &str, device: &str, owner: &str) -> reqwest::Response {
        let path = device_path(id);
        let request = match self {
            Class::Registry => hub.request(Method::GET, &path, owner),
            Class::D2cSend => hub
                .request(Method::POST, &format!("{path}/messages/events"), device)
                .body("{}"),
            Class::C2dSend => hub
                .request(Method::POST, &format!("{path}/commands"), owner)
                .body("hello"),
            Class::C2dReceive => {
                hub.request(Method::GET, &format!("{path}/messages/deviceBound"), device)
            }
        };
        request.send().await.unwrap()
    }

    /// The answer of a request that was not throttled: the route's own success status.
    async fn assert_served(self, response: reqwest::Response) {
        let status = response.status().as_u16();
        let expected: &[u16] = match self {
            Class::Registry => &[200],
            Class::D2cSend => &[204],
            Class::C2dSend => &[201],
            // A message when one is queued, none otherwise.
            Class::C2dReceive => &[200, 204],
        };
        assert!(
            expected.contains(&status),
            "{self:?}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }

    async fn assert_throttled(self, response: reqwest::Response) {
        let retry: u64 = response
            .headers()
            .get("retry-after")
            .unwrap_or_else(|| panic!("{self:?}: no Retry-After ({})", response.status()))
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=100).contains(&retry), "{self:?}: Retry-After {retry}");
        assert_error(response, 429, "ThrottlingException").await;
    }
}

#[tokio::test]
async fn no_limits_by_default() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    for _ in 0..60 {
        let response = hub
            .request(Method::GET, "/devices", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn an_iot_hub_tier_throttles_registry_operations_like_iot_hub() {
    // S1 with one unit: 100 registry operations a minute, bursts of 2.
    let hub = TestHub::start_with(|c| c.throttle.tier = Some(Tier::S1)).await;
    let token = hub.owner().await;
    // Unauthenticated requests are refused before they count.
    for _ in 0..5 {
        let response = hub
            .request(
                Method::GET,
                "/devices",
                "SharedAccessSignature sr=x&sig=AA==&se=1&skn=y",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    // Creating the device is a registry operation too: it takes one of the bucket's two tokens.
    let device = hub.create_device("tiered").await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = hub
            .request(Method::GET, "/devices", &token)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            let retry: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&retry), "Retry-After {retry}");
            assert_error(response, 429, "ThrottlingException").await;
        }
    }
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert_eq!(statuses[3], 429, "{statuses:?}");
    // The tier throttles the other classes too, each from its own bucket: an empty registry bucket leaves them be.
    let device_token = device_token("tiered", &primary_key(&device));
    for class in [Class::D2cSend, Class::C2dSend, Class::C2dReceive] {
        let response = class.call(&hub, "tiered", &device_token, &token).await;
        class.assert_served(response).await;
    }
}

#[tokio::test]
async fn an_explicit_rate_refills_over_time() {
    let hub = TestHub::start_with(|c| c.throttle.registry = Some(5.0)).await;
    let token = hub.owner().await;
    let mut throttled = 0;
    for _ in 0..10 {
        if hub
            .request(Method::GET, "/devices", &token)
            .send()
            .await
            .unwrap()
            .status()
            == 429
        {
            throttled += 1;
        }
    }
    assert!(
        throttled >= 4,
        "a burst of 10 over 5/s is throttled ({throttled})"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = hub
        .request(Method::GET, "/devices", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn each_class_limit_throttles_its_own_routes_only() {
    for class in CLASSES {
        let hub = TestHub::start_with(|c| class.limit(&mut c.throttle, false)).await;
        let owner = hub.owner().await;
        // Creating the device is a registry operation: under a registry limit it takes the one token.
        let device = hub.create_device("t-1").await;
        let token = device_token("t-1", &primary_key(&device));
        if class != Class::Registry {
            class
                .assert_served(class.call(&hub, "t-1", &token, &owner).await)
                .await;
        }
        class
            .assert_throttled(class.call(&hub, "t-1", &token, &owner).await)
            .await;
        for other in CLASSES.into_iter().filter(|o| *o != class) {
            other
                .assert_served(other.call(&hub, "t-1", &token, &owner).await)
                .await;
        }
    }
}

#[tokio::test]
async fn per_device_limits_throttle_one_device_and_one_class_only() {
    for class in [Class::D2cSend, Class::C2dSend, Class::C2dReceive] {
        let hub = TestHub::start_with(|c| class.limit(&mut c.throttle, true)).await;
        let owner = hub.owner().await;
        let a = hub.create_device("dev-a").await;
        let b = hub.create_device("dev-b").await;
        let token_a = device_token("dev-a", &primary_key(&a));
        let token_b = device_token("dev-b", &primary_key(&b));
        class
            .assert_served(class.call(&hub, "dev-a", &token_a, &owner).await)
            .await;
        class
            .assert_throttled(class.call(&hub, "dev-a", &token_a, &owner).await)
            .await;
        // Another device's bucket is its own, and so are the device's other classes.
        class
            .assert_served(class.call(&hub, "dev-b", &token_b, &owner).await)
            .await;
        for other in CLASSES.into_iter().filter(|o| *o != class) {
            other
                .assert_served(other.call(&hub, "dev-a", &token_a, &owner).await)
                .await;
        }
    }
}
