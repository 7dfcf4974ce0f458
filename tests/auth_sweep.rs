//! An authorization sweep over every operation the OpenAPI document lists: each default policy, a device's own
//! token, another device's token and no token at all, on each operation.
//!
//! A credential the operation's right admits gets the operation's real answer for the fixtures — exactly the
//! status in the table below (its success, or the 404/412 a missing resource gives), never merely "not 401". A
//! credential it does not admit gets 401. Operations without a security annotation must be listed as public here
//! and answer everyone. A route added to the document without a row here fails the sweep.

mod common;

use common::*;
use iothub::auth::{policies, Right};
use reqwest::Method;
use serde_json::{json, Value};

const TARGET: &str = "sweep-dev";
const OTHER: &str = "sweep-other";

/// Fixed keys: every case starts from the same devices with the same credentials.
const TARGET_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "HxweHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=";

/// One operation: the request the sweep sends, and what an admitted caller gets back.
struct Case {
    method: &'static str,
    /// The path as the OpenAPI document spells it.
    template: &'static str,
    /// The path sent, with the fixtures' names filled in.
    path: &'static str,
    body: Option<Value>,
    if_match: bool,
    /// The status an admitted caller gets, for fixtures as `reset` leaves them.
    admitted: u16,
}

const NO_LOCK: &str = "6f1c1b2e-6d8c-4a5e-9c2a-1f2e3d4c5b6a";

/// Operations that need no credential: they must answer anyone, whatever token comes with the request.
const PUBLIC: &[(&str, &str)] = &[
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/metrics"),
    // MQTT over WebSockets: the MQTT CONNECT authenticates; a request that is no upgrade is a 400.
    ("get", "/$iothub/websocket"),
];

fn cases() -> Vec<Case> {
    let case = |method, template, path, body: Option<Value>, admitted| Case {
        method,
        template,
        path,
        body,
        if_match: false,
        admitted,
    };
    let device = json!({"deviceId": TARGET, "authentication": {"symmetricKey": {"primaryKey": TARGET_KEY, "secondaryKey": TARGET_KEY}}});
    let lock_path = format!("/devices/{TARGET}/messages/deviceBound/{NO_LOCK}");
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    vec![
        case("get", "/devices", "/devices", None, 200),
        case(
            "post",
            "/devices",
            "/devices",
            Some(json!([{"id": "sweep-bulk", "importMode": "createOrUpdate"}])),
            200,
        ),
        case("get", "/devices/{id}", "/devices/sweep-dev", None, 200),
        Case {
            if_match: true,
            ..case(
                "put",
                "/devices/{id}",
                "/devices/sweep-dev",
                Some(device),
                200,
            )
        },
        case("delete", "/devices/{id}", "/devices/sweep-dev", None, 204),
        case(
            "get",
            "/devices/{id}/commands",
            "/devices/sweep-dev/commands",
            None,
            200,
        ),
        case(
            "post",
            "/devices/{id}/commands",
            "/devices/sweep-dev/commands",
            Some(json!({"hello": 1})),
            201,
        ),
        case(
            "delete",
            "/devices/{id}/commands",
            "/devices/sweep-dev/commands",
            None,
            200,
        ),
        // No message has this sequence number.
        case(
            "get",
            "/devices/{id}/commands/{sequenceNumber}",
            "/devices/sweep-dev/commands/999999999",
            None,
            404,
        ),
        // Nothing is queued for the fresh device.
        case(
            "get",
            "/devices/{id}/messages/deviceBound",
            "/devices/sweep-dev/messages/deviceBound",
            None,
            204,
        ),
        // No message is locked with this token.
        case(
            "delete",
            "/devices/{id}/messages/deviceBound/{lockToken}",
            leak(lock_path.clone()),
            None,
            412,
        ),
        case(
            "post",
            "/devices/{id}/messages/deviceBound/{lockToken}/abandon",
            leak(format!("{lock_path}/abandon")),
            None,
            412,
        ),
        case(
            "post",
            "/devices/{id}/messages/events",
            "/devices/sweep-dev/messages/events",
            Some(json!({"temperature": 21})),
            204,
        ),
        case("get", "/health/live", "/health/live", None, 200),
        case("get", "/health/ready", "/health/ready", None, 200),
        case("get", "/metrics", "/metrics", None, 200),
        case("get", "/$iothub/websocket", "/$iothub/websocket", None, 400),
        case("get", "/messages/events", "/messages/events", None, 200),
        case(
            "get",
            "/messages/events/consumerGroups",
            "/messages/events/consumerGroups",
            None,
            200,
        ),
        case(
            "get",
            "/messages/events/consumerGroups/{cg}",
            "/messages/events/consumerGroups/$Default",
            None,
            200,
        ),
        // `reset` deletes this group: creating it answers 201.
        case(
            "put",
            "/messages/events/consumerGroups/{cg}",
            "/messages/events/consumerGroups/sweep-new",
            None,
            201,
        ),
        // `reset` creates this one.
        case(
            "delete",
            "/messages/events/consumerGroups/{cg}",
            "/messages/events/consumerGroups/sweep-old",
            None,
            204,
        ),
        case(
            "get",
            "/messages/events/consumerGroups/{cg}/partitions/{p}",
            "/messages/events/consumerGroups/$Default/partitions/0",
            None,
            200,
        ),
        case(
            "put",
            "/messages/events/consumerGroups/{cg}/partitions/{p}/checkpoint",
            "/messages/events/consumerGroups/$Default/partitions/0/checkpoint",
            Some(json!({"sequenceNumber": 0})),
            200,
        ),
        case(
            "get",
            "/messages/events/consumerGroups/{cg}/stream",
            "/messages/events/consumerGroups/$Default/stream",
            None,
            200,
        ),
        case(
            "get",
            "/messages/events/partitions/{p}",
            "/messages/events/partitions/0",
            None,
            200,
        ),
        // No feedback is waiting, and none is locked with this token.
        case(
            "get",
            "/messages/serviceBound/feedback",
            "/messages/serviceBound/feedback",
            None,
            204,
        ),
        case(
            "delete",
            "/messages/serviceBound/feedback/{lockToken}",
            leak(format!("/messages/serviceBound/feedback/{NO_LOCK}")),
            None,
            412,
        ),
        case(
            "post",
            "/messages/serviceBound/feedback/{lockToken}/abandon",
            leak(format!("/messages/serviceBound/feedback/{NO_LOCK}/abandon")),
            None,
            412,
        ),
        case("get", "/policies", "/policies", None, 200),
        // `reset` deletes this policy: creating it answers 200.
        case(
            "put",
            "/policies/{name}",
            "/policies/sweep-new",
            Some(json!({"rights": "RegistryRead"})),
            200,
        ),
        case(
            "delete",
            "/policies/{name}",
            "/policies/sweep-policy",
            None,
            204,
        ),
        case(
            "post",
            "/policies/{name}/regenerateKey",
            "/policies/sweep-policy/regenerateKey",
            Some(json!({"key": "primary"})),
            200,
        ),
        case(
            "get",
            "/statistics/devices",
            "/statistics/devices",
            None,
            200,
        ),
        case(
            "get",
            "/statistics/service",
            "/statistics/service",
            None,
            200,
        ),
    ]
}

/// Puts every fixture back as the table expects it: fresh devices with the fixed keys (nothing queued), the policy
/// and group that cases delete present, the ones that cases create absent.
async fn reset(hub: &TestHub, owner: &str) {
    let send = |method: Method, path: &str| hub.request(method, path, owner);
    for (id, key) in [(TARGET, TARGET_KEY), (OTHER, OTHER_KEY)] {
        send(Method::DELETE, &device_path(id)).send().await.unwrap();
        let response = send(Method::PUT, &device_path(id))
            .json(&json!({"deviceId": id, "authentication": {"symmetricKey": {"primaryKey": key, "secondaryKey": key}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "re-create {id}");
    }
    let response = send(Method::PUT, "/policies/sweep-policy")
        .json(&json!({"rights": "RegistryRead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "sweep-policy");
    send(Method::DELETE, "/policies/sweep-new")
        .send()
        .await
        .unwrap();
    send(Method::DELETE, "/messages/events/consumerGroups/sweep-new")
        .send()
        .await
        .unwrap();
    let response = send(Method::PUT, "/messages/events/consumerGroups/sweep-old")
        .send()
        .await
        .unwrap();
    assert!(
        [200, 201].contains(&response.status().as_u16()),
        "sweep-old"
    );
}

#[tokio::test]
async fn every_route_admits_exactly_the_credentials_its_right_allows() {
    let hub = TestHub::start().await;
    let owner = hub.owner().await;
    let cases = cases();

    // The table and the document list the same operations, each once.
    let doc: Value = serde_json::to_value(iothub::http::openapi()).unwrap();
    let mut documented: Vec<(String, String, Option<String>)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let right = operation["security"][0]["sas"][0]
                .as_str()
                .map(str::to_string);
            documented.push((method.clone(), path.clone(), right));
        }
    }
    let mut tabled: Vec<(String, String)> = cases
        .iter()
        .map(|c| (c.method.to_string(), c.template.to_string()))
        .collect();
    tabled.sort();
    let mut listed: Vec<(String, String)> = documented
        .iter()
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect();
    listed.sort();
    assert_eq!(
        tabled, listed,
        "every documented operation needs one row in the sweep's table"
    );

    let mut credentials: Vec<(String, Option<String>)> = Vec::new();
    for (name, _) in policies::defaults() {
        credentials.push((name.to_string(), Some(hub.policy_token(name).await)));
    }
    credentials.push((
        "the device's own token".into(),
        Some(device_token(TARGET, TARGET_KEY)),
    ));
    credentials.push((
        "another device's token".into(),
        Some(device_token(OTHER, OTHER_KEY)),
    ));
    credentials.push(("no token".into(), None));

    let (mut with_sas, mut public, mut anonymous) = (0, 0, 0);
    for case in &cases {
        let right = documented
            .iter()
            .find(|(m, p, _)| m == case.method && p == case.template)
            .and_then(|(_, _, r)| r.as_deref());
        let right = match right {
            None => {
                assert!(
                    PUBLIC.contains(&(case.method, case.template)),
                    "{} {} has no security annotation but is not meant to be public",
                    case.method,
                    case.template
                );
                None
            }
            Some(name) => Some(
                Right::ALL
                    .into_iter()
                    .find(|r| r.name() == name)
                    .unwrap_or_else(|| {
                        panic!("{} {}: unknown right {name}", case.method, case.template)
                    }),
            ),
        };
        let method = Method::from_bytes(case.method.to_uppercase().as_bytes()).unwrap();
        for (who, token) in &credentials {
            let allowed = match (right, token) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(right), Some(_)) => match who.as_str() {
                    "the device's own token" => right == Right::DeviceConnect,
                    "another device's token" => false,
                    policy => policies::defaults()
                        .into_iter()
                        .any(|(name, rights)| name == policy && rights.allows(right)),
                },
            };
            reset(&hub, &owner).await;
            let mut request = hub
                .request(method.clone(), case.path, token.as_deref().unwrap_or(""))
                .timeout(std::time::Duration::from_secs(10));
            if token.is_none() {
                request = hub.http.request(
                    method.clone(),
                    format!(
                        "{}{}?api-version={}",
                        hub.base,
                        case.path,
                        iothub::cli::client::API_VERSION
                    ),
                );
            }
            if let Some(body) = &case.body {
                request = request.json(body);
            }
            if case.if_match {
                request = request.header("If-Match", "*");
            }
            let response = request
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {} as {who}: {e}", case.path));
            let status = response.status().as_u16();
            let context = format!("{method} {} as {who}", case.path);
            if allowed {
                let text = if status == case.admitted {
                    String::new()
                } else {
                    response.text().await.unwrap_or_default()
                };
                assert_eq!(status, case.admitted, "{context}: {text}");
            } else {
                assert_eq!(status, 401, "{context} must be refused");
                assert_error(response, 401, "IotHubUnauthorizedAccess").await;
            }
            match (right, token) {
                (None, _) => public += 1,
                (Some(_), None) => anonymous += 1,
                (Some(_), Some(_)) => with_sas += 1,
            }
        }
    }
    // 31 operations need a right, each tried with 7 credentials (5 policies, 2 device tokens) and with none; 4
    // are public, each tried with all 8.
    assert_eq!(with_sas, 31 * 7, "cases with a credential");
    assert_eq!(anonymous, 31, "cases without a credential");
    assert_eq!(public, 4 * 8, "cases on public operations");
}
