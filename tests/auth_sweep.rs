//! An authorization sweep over every route the OpenAPI document lists: each policy, a device's own token and
//! another device's token, on each operation. Routes added later are covered without touching this test, as long
//! as they declare the right they need (`security(("sas" = ["<Right>"]))`).

mod common;

use common::*;
use iothub::auth::{policies, Right};
use reqwest::Method;
use serde_json::{json, Value};

const TARGET: &str = "sweep-dev";
const OTHER: &str = "sweep-other";

fn fill(path: &str) -> String {
    let mut out = String::new();
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(match segment {
            "{id}" => TARGET,
            "{name}" => "sweep-policy",
            "{lockToken}" => "6f1c1b2e-6d8c-4a5e-9c2a-1f2e3d4c5b6a",
            "{sequenceNumber}" => "1",
            "{p}" | "{partition}" | "{partitionId}" => "0",
            "{cg}" | "{consumerGroup}" | "{group}" => "$Default",
            s if s.starts_with('{') => "x",
            s => s,
        });
    }
    out
}

/// Fixed keys: a route that deletes the device has it re-created with the same credentials.
const TARGET_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "HxweHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=";

async fn ensure_fixtures(hub: &TestHub, owner: &str) {
    for (id, key) in [(TARGET, TARGET_KEY), (OTHER, OTHER_KEY)] {
        hub.request(Method::PUT, &device_path(id), owner)
            .json(&json!({"deviceId": id, "authentication": {"symmetricKey": {"primaryKey": key, "secondaryKey": key}}}))
            .send()
            .await
            .unwrap();
    }
    hub.request(Method::PUT, "/policies/sweep-policy", owner)
        .json(&json!({"rights": "RegistryRead"}))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn every_route_admits_exactly_the_credentials_its_right_allows() {
    let hub = TestHub::start().await;
    let owner = hub.owner().await;
    ensure_fixtures(&hub, &owner).await;
    let (target_key, other_key) = (TARGET_KEY, OTHER_KEY);

    let doc: Value = serde_json::to_value(iothub::http::openapi()).unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let Some(right) = operation["security"][0]["sas"][0].as_str() else {
                continue;
            };
            let right = Right::ALL
                .into_iter()
                .find(|r| r.name() == right)
                .unwrap_or_else(|| panic!("{method} {path}: unknown right {right}"));
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();

            let mut credentials: Vec<(String, String, bool)> = Vec::new();
            for (name, rights) in policies::defaults() {
                credentials.push((
                    name.to_string(),
                    hub.policy_token(name).await,
                    rights.allows(right),
                ));
            }
            let device_route = right == Right::DeviceConnect;
            credentials.push((
                "the device's own token".into(),
                device_token(TARGET, target_key),
                device_route,
            ));
            credentials.push((
                "another device's token".into(),
                device_token(OTHER, other_key),
                false,
            ));

            for (who, token, allowed) in credentials {
                ensure_fixtures(&hub, &owner).await;
                let response = hub
                    .request(method.clone(), &fill(path), &token)
                    .json(&json!({}))
                    .timeout(std::time::Duration::from_secs(10))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path} as {who}: {e}"));
                let status = response.status().as_u16();
                if allowed {
                    assert_ne!(status, 401, "{method} {path} must admit {who}");
                    assert!(status < 500, "{method} {path} as {who}: {status}");
                } else {
                    assert_eq!(status, 401, "{method} {path} must refuse {who}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 7 * 11, "the sweep covered {checked} cases");
}
