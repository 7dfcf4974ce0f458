//! The device registry over REST, against a real PostgreSQL: CRUD, etags, pagination, bulk, statistics.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn create_read_list_delete() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;

    let created = hub.create_device("thermostat-1").await;
    assert_eq!(created["deviceId"], "thermostat-1");
    assert_eq!(created["status"], "enabled");
    assert_eq!(created["connectionState"], "Disconnected");
    assert_eq!(created["statusUpdatedTime"], "0001-01-01T00:00:00Z");
    assert_eq!(created["authentication"]["type"], "sas");
    assert_eq!(created["cloudToDeviceMessageCount"], 0);
    // Generated keys: 32 random bytes each, different from each other.
    let primary = primary_key(&created);
    assert_eq!(primary.len(), 44);
    assert_ne!(primary, secondary_key(&created));
    assert!(created["generationId"].as_str().unwrap().len() >= 18);

    let response = hub
        .request(Method::GET, "/devices/thermostat-1", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let etag = response.headers()["etag"].to_str().unwrap().to_string();
    let fetched: Value = response.json().await.unwrap();
    assert_eq!(etag, format!("\"{}\"", fetched["etag"].as_str().unwrap()));
    assert_eq!(fetched, created);

    let list: Vec<Value> = hub
        .request(Method::GET, "/devices", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 1);

    let response = hub
        .request(Method::DELETE, "/devices/thermostat-1", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = hub
        .request(Method::GET, "/devices/thermostat-1", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "DeviceNotFound").await;
    let response = hub
        .request(Method::DELETE, "/devices/thermostat-1", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "DeviceNotFound").await;
}

#[tokio::test]
async fn create_twice_conflicts_and_recreate_changes_generation() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    let first = hub.create_device("d1").await;
    let response = hub
        .request(Method::PUT, "/devices/d1", &token)
        .json(&json!({"deviceId": "d1"}))
        .send()
        .await
        .unwrap();
    assert_error(response, 409, "DeviceAlreadyExists").await;

    hub.request(Method::DELETE, "/devices/d1", &token)
        .send()
        .await
        .unwrap();
    let second = hub.create_device("d1").await;
    assert_ne!(first["generationId"], second["generationId"]);
    assert_ne!(first["etag"], second["etag"]);
    assert_ne!(primary_key(&first), primary_key(&second));
}

#[tokio::test]
async fn supplied_keys_status_and_reason_are_kept_byte_exact() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let reason = "maintenance — \u{1F527} \"quoted\" 'single' <tag> ✓";
    let response = hub
        .request(Method::PUT, "/devices/k1", &token)
        .json(&json!({
            "deviceId": "k1", "status": "disabled", "statusReason": reason,
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": ""}},
            "capabilities": {"iotEdge": true}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let device: Value = response.json().await.unwrap();
    assert_eq!(primary_key(&device), key);
    // An empty key is generated, as on IoT Hub.
    assert_eq!(secondary_key(&device).len(), 44);
    assert_eq!(device["status"], "disabled");
    assert_eq!(device["statusReason"], reason);
    assert_eq!(device["capabilities"]["iotEdge"], true);
}

#[tokio::test]
async fn every_device_id_character_round_trips_and_ids_are_case_sensitive() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    let ids = [
        "a-b:c.d+e%f_g#h*i?j!k(l)m,n=o@p;q$r's",
        "Dev",
        "dev",
        "100%",
        "a+b",
    ];
    for id in ids {
        let created = hub.create_device(id).await;
        assert_eq!(created["deviceId"], id);
    }
    for id in ids {
        let response = hub
            .request(Method::GET, &device_path(id), &token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{id}");
        let device: Value = response.json().await.unwrap();
        assert_eq!(device["deviceId"], id);
    }
    // '+' in a path is a plus, never a space.
    let response = hub
        .request(Method::GET, "/devices/a+b", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn invalid_input_is_a_400_in_iot_hub_shape() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    let cases: Vec<(String, Value)> = vec![
        (device_path("has space"), json!({})),
        (device_path(&"x".repeat(129)), json!({})),
        (device_path("é"), json!({})),
        ("/devices/d1".into(), json!({"deviceId": "other"})),
        ("/devices/d1".into(), json!({"status": "sleeping"})),
        (
            "/devices/d1".into(),
            json!({"statusReason": "nul\u{0}byte"}),
        ),
        (
            "/devices/d1".into(),
            json!({"authentication": {"symmetricKey": {"primaryKey": "short"}}}),
        ),
        (
            "/devices/d1".into(),
            json!({"authentication": {"type": "magic"}}),
        ),
        ("/devices/d1".into(), json!({"status": 5})),
    ];
    for (path, body) in cases {
        let response = hub
            .request(Method::PUT, &path, &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(response, 400, "ArgumentInvalid").await;
    }
    let response = hub
        .request(Method::PUT, "/devices/d1", &token)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
    // Nothing was created by any of them.
    let stats: Value = hub
        .request(Method::GET, "/statistics/devices", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["totalDeviceCount"], 0);
}

#[tokio::test]
async fn updates_need_the_current_etag() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    let created = hub.create_device("e1").await;
    let etag = created["etag"].as_str().unwrap().to_string();

    let update = |if_match: String, status: &'static str| {
        hub.request(Method::PUT, "/devices/e1", &token)
            .header("If-Match", if_match)
            .json(&json!({"deviceId": "e1", "status": status}))
            .send()
    };
    let response = update(format!("\"{etag}\""), "disabled").await.unwrap();
    assert_eq!(response.status(), 200);
    let updated: Value = response.json().await.unwrap();
    assert_eq!(updated["status"], "disabled");
    assert_ne!(updated["etag"], etag);
    assert_ne!(updated["statusUpdatedTime"], "0001-01-01T00:00:00Z");
    // Keys stay when the update does not mention them.
    assert_eq!(primary_key(&updated), primary_key(&created));

    // The old etag is stale now.
    let response = update(format!("\"{etag}\""), "enabled").await.unwrap();
    assert_error(response, 412, "PreconditionFailed").await;
    let response = update("\"bm90LWFuLWV0YWc=\"".into(), "enabled")
        .await
        .unwrap();
    assert_error(response, 412, "PreconditionFailed").await;
    // "*" forces.
    let response = update("\"*\"".into(), "enabled").await.unwrap();
    assert_eq!(response.status(), 200);

    // Update never creates.
    let response = hub
        .request(Method::PUT, "/devices/ghost", &token)
        .header("If-Match", "*")
        .json(&json!({"deviceId": "ghost"}))
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "DeviceNotFound").await;

    // Delete with a stale etag is refused; with the current one it works.
    let current: Value = hub
        .request(Method::GET, "/devices/e1", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let response = hub
        .request(Method::DELETE, "/devices/e1", &token)
        .header("If-Match", format!("\"{etag}\""))
        .send()
        .await
        .unwrap();
    assert_error(response, 412, "PreconditionFailed").await;
    let response = hub
        .request(Method::DELETE, "/devices/e1", &token)
        .header(
            "If-Match",
            format!("\"{}\"", current["etag"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}

#[tokio::test]
async fn racing_updates_with_one_etag_let_exactly_one_win() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    for round in 0..5 {
        let id = format!("race-{round}");
        let created = hub.create_device(&id).await;
        let if_match = format!("\"{}\"", created["etag"].as_str().unwrap());
        let send = |reason: &'static str| {
            hub.request(Method::PUT, &device_path(&id), &token)
                .header("If-Match", if_match.clone())
                .json(&json!({"deviceId": id, "statusReason": reason}))
                .send()
        };
        let (a, b) = tokio::join!(send("a"), send("b"));
        let mut statuses = [a.unwrap().status().as_u16(), b.unwrap().status().as_u16()];
        statuses.sort();
        assert_eq!(statuses, [200, 412], "round {round}");
    }
}

#[tokio::test]
async fn listing_pages_with_a_continuation() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    let mut expected: Vec<String> = (0..25).map(|i| format!("dev-{i:03}")).collect();
    let entries: Vec<Value> = expected
        .iter()
        .map(|id| json!({"id": id, "importMode": "create"}))
        .collect();
    let response = hub
        .request(Method::POST, "/devices", &token)
        .json(&entries)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    expected.sort();

    let mut seen = Vec::new();
    let mut continuation: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut request = hub.request(Method::GET, "/devices?top=10", &token);
        if let Some(c) = &continuation {
            request = request.header("x-ms-continuation", c);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        continuation = response
            .headers()
            .get("x-ms-continuation")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Vec<Value> = response.json().await.unwrap();
        assert!(page.len() <= 10);
        seen.extend(
            page.iter()
                .map(|d| d["deviceId"].as_str().unwrap().to_string()),
        );
        pages += 1;
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);

    for bad in [
        "/devices?top=0",
        "/devices?top=1001",
        "/devices?top=ten",
        "/devices?continuationToken=%%%",
        // Well-formed base64 of NUL and of "a" NUL: no key holds NUL (and PostgreSQL text cannot).
        "/devices?continuationToken=AA",
        "/devices?continuationToken=YQA",
    ] {
        let response = hub.request(Method::GET, bad, &token).send().await.unwrap();
        assert_error(response, 400, "ArgumentInvalid").await;
    }
}

#[tokio::test]
async fn bulk_applies_each_entry_and_reports_failures() {
    let hub = TestHub::start().await;
    let token = hub.owner().await;
    hub.create_device("existing").await;
    let to_delete = hub.create_device("doomed").await;
    let response = hub
        .request(Method::POST, "/devices", &token)
        .json(&json!([
            {"id": "new-1", "importMode": "create"},
            {"id": "new-2", "importMode": "Create", "status": "disabled"},
            {"id": "existing", "importMode": "create"},
            {"id": "existing", "importMode": "update", "status": "disabled"},
            {"id": "missing", "importMode": "update"},
            {"id": "doomed", "importMode": "deleteIfMatchETag", "eTag": to_delete["etag"]},
            {"id": "bad id", "importMode": "create"},
            {"id": "x", "importMode": "teleport"},
            {"id": "upsert", "importMode": "createOrUpdate"},
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["isSuccessful"], false);
    let failed: Vec<(&str, &str)> = result["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["deviceId"].as_str().unwrap(),
                e["errorCode"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        failed,
        vec![
            ("existing", "DeviceAlreadyExists"),
            ("missing", "DeviceNotFound"),
            ("bad id", "ArgumentInvalid"),
            ("x", "ArgumentInvalid"),
        ]
    );
    let stats: Value = hub
        .request(Method::GET, "/statistics/devices", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // existing, new-1, new-2, upsert; doomed is gone.
    assert_eq!(
        stats,
        json!({"totalDeviceCount": 4, "enabledDeviceCount": 2, "disabledDeviceCount": 2})
    );

    let response = hub
        .request(Method::POST, "/devices", &token)
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"id": format!("m{i}"), "importMode": "create"}))
        .collect();
    let response = hub
        .request(Method::POST, "/devices", &token)
        .json(&too_many)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
}

#[tokio::test]
async fn service_statistics_report_no_connected_devices() {
    let hub = TestHub::start().await;
    let token = hub.policy_token("registryRead").await;
    let stats: Value = hub
        .request(Method::GET, "/statistics/service", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, json!({"connectedDeviceCount": 0}));
}
