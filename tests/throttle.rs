//! Throttling over HTTP: none by default; a configured or tier limit answers 429 (429001) with Retry-After.

mod common;

use std::time::Duration;

use common::*;
use iothub::throttle::Tier;
use reqwest::Method;

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
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    assert_eq!(statuses[3], 429, "{statuses:?}");
    // Other operation classes are not affected by the registry's bucket.
    let response = hub
        .http
        .get(format!("{}/health/ready", hub.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
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
