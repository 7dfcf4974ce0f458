//! SAS authentication and authorization: the policy × endpoint matrix, every kind of bad token, device tokens,
//! key rotation, and policy management without privilege escalation.

mod common;

use common::*;
use iothub::auth::{authorize_device, sas, Credentials, DeviceCredential};
use iothub::http::error::ErrorCode;
use reqwest::Method;
use serde_json::{json, Value};

const POLICIES: [&str; 5] = [
    "iothubowner",
    "service",
    "device",
    "registryRead",
    "registryReadWrite",
];

#[tokio::test]
async fn each_policy_reaches_exactly_the_endpoints_its_rights_allow() {
    let hub = TestHub::start().await;
    hub.create_device("m1").await;
    for policy in POLICIES {
        let token = hub.policy_token(policy).await;
        let can_read = matches!(policy, "iothubowner" | "registryRead" | "registryReadWrite");
        let can_write = matches!(policy, "iothubowner" | "registryReadWrite");

        for (method, path) in [
            (Method::GET, "/devices/m1"),
            (Method::GET, "/devices"),
            (Method::GET, "/statistics/devices"),
            (Method::GET, "/statistics/service"),
        ] {
            let response = hub.request(method, path, &token).send().await.unwrap();
            if can_read {
                assert_eq!(response.status(), 200, "{policy} {path}");
            } else {
                assert_error(response, 401, "IotHubUnauthorizedAccess").await;
            }
        }

        let id = format!("by-{policy}");
        let writes = [
            hub.request(Method::PUT, &device_path(&id), &token)
                .json(&json!({"deviceId": id})),
            hub.request(Method::POST, "/devices", &token)
                .json(&json!([{"id": format!("bulk-{policy}"), "importMode": "create"}])),
            hub.request(Method::DELETE, "/devices/nonexistent", &token),
            hub.request(Method::GET, "/policies", &token),
        ];
        for (i, request) in writes.into_iter().enumerate() {
            let response = request.send().await.unwrap();
            if can_write {
                let expected = if i == 2 { 404 } else { 200 };
                assert_eq!(response.status(), expected, "{policy} write #{i}");
            } else {
                assert_error(response, 401, "IotHubUnauthorizedAccess").await;
            }
        }
    }
}

/// A token for the owner policy with every part chosen by the test.
fn owner_token(key: &str, resource: &str, expiry: i64, name: Option<&str>) -> String {
    sas::sign(resource, key, name, expiry).unwrap()
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401() {
    let hub = TestHub::start().await;
    hub.create_device("t1").await;
    let key = hub.policy_key("iothubowner").await;
    let read_key = hub.policy_key("registryRead").await;
    let secondary = iothub::auth::policies::get(&hub.db, "iothubowner")
        .await
        .unwrap()
        .unwrap()
        .secondary_key;
    let n = now();

    let good = [
        (
            "the primary key",
            owner_token(&key, HOST, n + 60, Some("iothubowner")),
        ),
        (
            "the secondary key",
            owner_token(&secondary, HOST, n + 60, Some("iothubowner")),
        ),
        (
            "expired within the 5 minutes of skew",
            owner_token(&key, HOST, n - 200, Some("iothubowner")),
        ),
        (
            "a host with a port",
            owner_token(&key, &format!("{HOST}:443"), n + 60, Some("iothubowner")),
        ),
        (
            "an upper-case host",
            owner_token(&key, &HOST.to_uppercase(), n + 60, Some("iothubowner")),
        ),
        (
            "a scope of the devices collection",
            owner_token(
                &key,
                &format!("{HOST}/devices"),
                n + 60,
                Some("iothubowner"),
            ),
        ),
        (
            "a scope of the device itself",
            owner_token(
                &key,
                &format!("{HOST}/devices/t1"),
                n + 60,
                Some("iothubowner"),
            ),
        ),
    ];
    for (what, token) in good {
        let response = hub
            .request(Method::GET, "/devices/t1", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{what}");
    }

    let forged_key = sas::generate_key();
    let bad = [
        (
            "expired",
            owner_token(&key, HOST, n - 400, Some("iothubowner")),
        ),
        (
            "forged",
            owner_token(&forged_key, HOST, n + 60, Some("iothubowner")),
        ),
        (
            "another policy's key",
            owner_token(&read_key, HOST, n + 60, Some("iothubowner")),
        ),
        (
            "an unknown policy",
            owner_token(&key, HOST, n + 60, Some("nobody")),
        ),
        (
            "another hub",
            owner_token(&key, "otherhub.example.net", n + 60, Some("iothubowner")),
        ),
        (
            "another device's scope",
            owner_token(
                &key,
                &format!("{HOST}/devices/t2"),
                n + 60,
                Some("iothubowner"),
            ),
        ),
        (
            "a prefix that is not a segment",
            owner_token(
                &key,
                &format!("{HOST}/devices/t"),
                n + 60,
                Some("iothubowner"),
            ),
        ),
        ("no skn", owner_token(&key, HOST, n + 60, None)),
        ("not a SAS", "Bearer abc".to_string()),
        ("garbage", "SharedAccessSignature sr=&&&".to_string()),
        (
            "a tampered expiry",
            owner_token(&key, HOST, n + 60, Some("iothubowner"))
                .replace(&format!("se={}", n + 60), &format!("se={}", n + 6000)),
        ),
    ];
    for (what, token) in bad {
        let response = hub
            .request(Method::GET, "/devices/t1", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{what}");
        assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    }
    let response = hub
        .http
        .get(format!("{}/devices/t1?api-version=2021-04-12", hub.base))
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;
}

#[tokio::test]
async fn a_device_token_never_reaches_service_endpoints() {
    let hub = TestHub::start().await;
    let device = hub.create_device("dev-a").await;
    let token = device_token("dev-a", &primary_key(&device));
    for (method, path) in [
        (Method::GET, "/devices/dev-a"),
        (Method::GET, "/devices"),
        (Method::PUT, "/devices/dev-a"),
        (Method::GET, "/statistics/devices"),
        (Method::GET, "/policies"),
    ] {
        let response = hub
            .request(method, path, &token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    }
}

#[tokio::test]
async fn device_credentials_reach_only_their_own_enabled_device() {
    let hub = TestHub::start().await;
    let a = hub.create_device("dev-a").await;
    hub.create_device("dev-b").await;
    let target = |id: &str| {
        vec![
            "devices".to_string(),
            id.to_string(),
            "messages".to_string(),
            "events".to_string(),
        ]
    };
    let check = |token: String, id: &'static str| {
        let db = hub.db.clone();
        async move {
            authorize_device(
                &Credentials::uncached(db),
                HOST,
                Some(&token),
                id,
                &target(id),
            )
            .await
            .map_err(iothub::http::error::ApiError::from)
        }
    };

    let own = check(device_token("dev-a", &primary_key(&a)), "dev-a")
        .await
        .unwrap();
    assert_eq!(own.device_id, "dev-a");
    assert_eq!(own.generation_id, a["generationId"].as_str().unwrap());
    assert_eq!(own.credential, DeviceCredential::DeviceKey);
    check(device_token("dev-a", &secondary_key(&a)), "dev-a")
        .await
        .unwrap();

    // A's token, or A's key with B's name in the scope, never acts as B.
    let err = check(device_token("dev-a", &primary_key(&a)), "dev-b")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::IotHubUnauthorizedAccess);
    let err = check(device_token("dev-b", &primary_key(&a)), "dev-b")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::IotHubUnauthorizedAccess);
    // A device-key token must name its device.
    let hub_scoped = sas::sign(HOST, &primary_key(&a), None, now() + 60).unwrap();
    assert!(check(hub_scoped, "dev-a").await.is_err());
    // Expired.
    let old = sas::sign(
        &format!("{HOST}/devices/dev-a"),
        &primary_key(&a),
        None,
        now() - 400,
    )
    .unwrap();
    assert!(check(old, "dev-a").await.is_err());
    // Unknown device with a device token.
    let err = check(device_token("ghost", &primary_key(&a)), "ghost")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::IotHubUnauthorizedAccess);

    // Policies: DeviceConnect acts for any device; other rights do not.
    let device_policy = hub.policy_token("device").await;
    let via = check(device_policy.clone(), "dev-b").await.unwrap();
    assert_eq!(via.credential, DeviceCredential::Policy("device".into()));
    let err = check(hub.policy_token("service").await, "dev-b")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::IotHubUnauthorizedAccess);
    let err = check(device_policy.clone(), "ghost").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::DeviceNotFound);

    // A disabled device is refused, whatever the credential.
    hub.disable_device("dev-a").await;
    let err = check(device_token("dev-a", &primary_key(&a)), "dev-a")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::IotHubUnauthorizedAccess);
    assert!(check(device_policy, "dev-a").await.is_err());
}

#[tokio::test]
async fn device_ids_encoded_twice_in_the_scope_are_accepted() {
    // The C# SDK URL-encodes the device id inside the resource and then the whole resource again.
    let hub = TestHub::start().await;
    let id = "odd id?#=".replace(' ', "+");
    let device = hub.create_device(&id).await;
    let resource = format!("{HOST}/devices/{}", sas::encode_component(&id));
    let token = sas::sign(&resource, &primary_key(&device), None, now() + 60).unwrap();
    let target = vec![
        "devices".to_string(),
        id.clone(),
        "messages".to_string(),
        "events".to_string(),
    ];
    authorize_device(
        &Credentials::uncached(hub.db.clone()),
        HOST,
        Some(&token),
        &id,
        &target,
    )
    .await
    .unwrap();
}

/// A device call that authenticates through the hub's credential cache: a C2D receive, 204 when nothing is queued.
async fn device_call(base: &str, id: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!(
            "{base}{}/messages/deviceBound?api-version={}",
            device_path(id),
            iothub::cli::client::API_VERSION
        ))
        .header("Authorization", token)
        .send()
        .await
        .unwrap()
}

/// How soon another hub process must refuse what a change through this one revoked: a quarter of the credential
/// cache's default lifetime, so only the change's notification can make it in time (a liveness deadline for a
/// loaded machine; a notification arrives within milliseconds).
const PROMPTLY: std::time::Duration = std::time::Duration::from_secs(15);

/// Polls `call` until it answers `status`, for at most [`PROMPTLY`].
async fn eventually_answers<F, Fut>(status: u16, what: &str, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = reqwest::Response>,
{
    let deadline = std::time::Instant::now() + PROMPTLY;
    loop {
        let got = call().await.status().as_u16();
        if got == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: still {got}, not {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A second hub process on the test hub's database, with its own credential cache.
async fn other_process(hub: &TestHub, name: &str) -> HubProcess {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", uuid::Uuid::new_v4()));
    HubProcess::start(&hub.database_url(), &dir).await
}

#[tokio::test]
async fn rotating_a_key_invalidates_tokens_signed_with_the_old_one() {
    let hub = TestHub::start().await;
    let old_primary = hub.owner().await;
    // In use, so the policy's keys are in the credential cache.
    let response = hub
        .request(Method::GET, "/devices", &old_primary)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let key = iothub::auth::policies::get(&hub.db, "iothubowner")
        .await
        .unwrap()
        .unwrap();
    let by_secondary =
        sas::sign(HOST, &key.secondary_key, Some("iothubowner"), now() + 600).unwrap();

    let response = hub
        .request(
            Method::POST,
            "/policies/iothubowner/regenerateKey",
            &by_secondary,
        )
        .json(&json!({"key": "primary"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let policy: Value = response.json().await.unwrap();
    assert_ne!(policy["primaryKey"], key.primary_key.as_str());
    assert_eq!(policy["secondaryKey"], key.secondary_key.as_str());

    let response = hub
        .request(Method::GET, "/devices", &old_primary)
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    let fresh = hub.owner().await;
    let response = hub
        .request(Method::GET, "/devices", &fresh)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Device keys too, through the credential cache of this process and of another one: both serve the old
    // token (so its keys are cached), new keys are written through this process, and the old token is refused
    // here at once and there within the cache's lifetime, while a token signed with the new key is served.
    let device = hub.create_device("rot").await;
    let old_device_token = device_token("rot", &primary_key(&device));
    let other = other_process(&hub, "rotation").await;
    for base in [&hub.base, &other.base] {
        assert_eq!(
            device_call(base, "rot", &old_device_token).await.status(),
            204,
            "{base}"
        );
    }
    let new_key = sas::generate_key();
    let response = hub
        .request(Method::PUT, "/devices/rot", &fresh)
        .header("If-Match", "*")
        .json(&json!({"deviceId": "rot", "authentication": {"symmetricKey": {"primaryKey": new_key, "secondaryKey": sas::generate_key()}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let new_device_token = device_token("rot", &new_key);
    assert_error(
        device_call(&hub.base, "rot", &old_device_token).await,
        401,
        "IotHubUnauthorizedAccess",
    )
    .await;
    assert_eq!(
        device_call(&hub.base, "rot", &new_device_token)
            .await
            .status(),
        204
    );
    eventually_answers(401, "the other process, old token", || {
        device_call(&other.base, "rot", &old_device_token)
    })
    .await;
    eventually_answers(204, "the other process, new token", || {
        device_call(&other.base, "rot", &new_device_token)
    })
    .await;
    other.kill().await;
}

#[tokio::test]
async fn a_deleted_devices_token_is_refused_even_when_its_id_is_reused() {
    let hub = TestHub::start().await;
    let owner = hub.owner().await;
    let first = hub.create_device("gone").await;
    let old = device_token("gone", &primary_key(&first));
    let other = other_process(&hub, "deleted").await;
    for base in [&hub.base, &other.base] {
        assert_eq!(
            device_call(base, "gone", &old).await.status(),
            204,
            "{base}"
        );
    }

    let response = hub
        .request(Method::DELETE, "/devices/gone", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_error(
        device_call(&hub.base, "gone", &old).await,
        401,
        "IotHubUnauthorizedAccess",
    )
    .await;
    eventually_answers(401, "the other process, deleted device", || {
        device_call(&other.base, "gone", &old)
    })
    .await;

    // The same id again, with new keys: the old token stays refused, in both processes, and the new one works.
    let second = hub.create_device("gone").await;
    assert_ne!(primary_key(&first), primary_key(&second));
    assert_ne!(secondary_key(&first), secondary_key(&second));
    let new = device_token("gone", &primary_key(&second));
    for base in [&hub.base, &other.base] {
        assert_error(
            device_call(base, "gone", &old).await,
            401,
            "IotHubUnauthorizedAccess",
        )
        .await;
        assert_eq!(
            device_call(base, "gone", &new).await.status(),
            204,
            "{base}"
        );
    }
    other.kill().await;
}

#[tokio::test]
async fn policy_management_cannot_escalate_rights() {
    let hub = TestHub::start().await;
    let rw = hub.policy_token("registryReadWrite").await;

    // Listing shows keys only for policies the caller's rights cover.
    let list: Vec<Value> = hub
        .request(Method::GET, "/policies", &rw)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 5);
    for policy in &list {
        let visible = policy["primaryKey"].is_string();
        let expected = matches!(
            policy["keyName"].as_str().unwrap(),
            "registryRead" | "registryReadWrite"
        );
        assert_eq!(visible, expected, "{policy}");
    }

    for (name, rights) in [
        ("sneaky", "ServiceConnect"),
        ("iothubowner", "RegistryRead"),
    ] {
        let response = hub
            .request(Method::PUT, &format!("/policies/{name}"), &rw)
            .json(&json!({"rights": rights}))
            .send()
            .await
            .unwrap();
        assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    }
    let response = hub
        .request(Method::POST, "/policies/service/regenerateKey", &rw)
        .json(&json!({"key": "both"}))
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;

    // Within its rights it can manage policies, and the new policy works at once.
    let response = hub
        .request(Method::PUT, "/policies/auditor", &rw)
        .json(&json!({"rights": "RegistryRead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let auditor: Value = response.json().await.unwrap();
    assert_eq!(auditor["rights"], "RegistryRead");
    let token = sas::sign(
        HOST,
        auditor["primaryKey"].as_str().unwrap(),
        Some("auditor"),
        now() + 60,
    )
    .unwrap();
    let response = hub
        .request(Method::GET, "/devices", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    for (body, code) in [
        (json!({"rights": "Everything"}), "ArgumentInvalid"),
        (
            json!({"rights": "RegistryRead", "primaryKey": "short"}),
            "ArgumentInvalid",
        ),
    ] {
        let response = hub
            .request(Method::PUT, "/policies/p2", &rw)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(response, 400, code).await;
    }
    let response = hub
        .request(Method::PUT, "/policies/bad%20name", &rw)
        .json(&json!({"rights": "RegistryRead"}))
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;

    let response = hub
        .request(Method::DELETE, "/policies/auditor", &rw)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = hub
        .request(Method::GET, "/devices", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    let response = hub
        .request(Method::DELETE, "/policies/auditor", &rw)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "PolicyNotFound").await;
}

#[tokio::test]
async fn the_last_policy_that_can_manage_the_registry_cannot_be_deleted() {
    let hub = TestHub::start().await;
    let owner = hub.owner().await;
    let response = hub
        .request(Method::DELETE, "/policies/registryReadWrite", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = hub
        .request(Method::DELETE, "/policies/iothubowner", &owner)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
    let response = hub
        .request(Method::GET, "/devices", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[test]
fn the_default_cache_lifetime_is_far_above_the_prompt_deadline() {
    let config = iothub::Config::with_database("postgres://unused");
    assert!(
        config.auth_cache() >= PROMPTLY * 4,
        "{:?}",
        config.auth_cache()
    );
}

/// GET /devices with a service token: 200 while its policy's keys (and RegistryRead) hold.
async fn list_devices(base: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!(
            "{base}/devices?api-version={}",
            iothub::cli::client::API_VERSION
        ))
        .header("Authorization", token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn changes_made_through_another_process_are_refused_promptly() {
    // This process caches with the default lifetime; every change goes through the other one.
    let hub = TestHub::start().await;
    assert_eq!(
        hub.config.auth_cache(),
        iothub::Config::with_database("x").auth_cache()
    );
    let other = other_process(&hub, "elsewhere").await;
    let owner = hub.owner().await;
    let through_other = |method: Method, path: &str| {
        let separator = if path.contains('?') { '&' } else { '?' };
        reqwest::Client::new()
            .request(
                method,
                format!(
                    "{}{path}{separator}api-version={}",
                    other.base,
                    iothub::cli::client::API_VERSION
                ),
            )
            .header("Authorization", &owner)
    };
    let mut device_tokens = Vec::new();
    for id in ["disabled", "bulk-disabled", "bulk-deleted"] {
        let device = hub.create_device(id).await;
        let token = device_token(id, &primary_key(&device));
        assert_eq!(
            device_call(&hub.base, id, &token).await.status(),
            204,
            "{id}"
        );
        device_tokens.push((id, token));
    }
    let reader = hub.policy_token("registryRead").await;
    let writer = hub.policy_token("registryReadWrite").await;
    for token in [&reader, &writer] {
        assert_eq!(list_devices(&hub.base, token).await.status(), 200);
    }

    let response = through_other(Method::PUT, "/devices/disabled")
        .header("If-Match", "*")
        .json(&json!({"deviceId": "disabled", "status": "disabled"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = through_other(Method::POST, "/devices")
        .json(&json!([
            {"id": "bulk-disabled", "importMode": "update", "status": "disabled"},
            {"id": "bulk-deleted", "importMode": "delete"},
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = through_other(Method::POST, "/policies/registryRead/regenerateKey")
        .json(&json!({"key": "both"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = through_other(Method::DELETE, "/policies/registryReadWrite")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    for (id, token) in &device_tokens {
        eventually_answers(401, id, || device_call(&hub.base, id, token)).await;
    }
    eventually_answers(401, "a rotated policy", || list_devices(&hub.base, &reader)).await;
    eventually_answers(401, "a deleted policy", || list_devices(&hub.base, &writer)).await;
    let rotated = hub.policy_token("registryRead").await;
    assert_eq!(list_devices(&hub.base, &rotated).await.status(), 200);
    other.kill().await;
}

/// Sets a device's primary key by SQL, as a write that sends no notification would.
async fn set_key_silently(db: &sqlx::PgPool, id: &str, key: &str) {
    sqlx::query("UPDATE devices SET primary_key = $2 WHERE device_id = $1")
        .bind(id)
        .bind(key)
        .execute(db)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_cache_serves_until_told_and_forgets_everything_when_listening_again() {
    let hub = TestHub::start().await;
    let device = hub.create_device("quiet").await;
    let old = device_token("quiet", &primary_key(&device));
    assert_eq!(device_call(&hub.base, "quiet", &old).await.status(), 204);
    let new_key = sas::generate_key();
    let new = device_token("quiet", &new_key);
    set_key_silently(&hub.db, "quiet", &new_key).await;
    // Nothing told this process: it still authenticates with the keys it read.
    assert_eq!(device_call(&hub.base, "quiet", &old).await.status(), 204);
    assert_eq!(device_call(&hub.base, "quiet", &new).await.status(), 401);

    // The LISTEN connection is cut: whatever was sent meanwhile is lost, so once the hub listens again it
    // forgets every entry.
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&hub.db)
    .await
    .unwrap();
    assert_eq!(cut, vec![true], "the hub's one LISTEN connection");
    eventually_answers(204, "the new key after reconnecting", || {
        device_call(&hub.base, "quiet", &new)
    })
    .await;
    assert_eq!(device_call(&hub.base, "quiet", &old).await.status(), 401);
}

#[tokio::test]
async fn changes_whose_notification_is_lost_take_effect_within_the_cache_time() {
    let hub = TestHub::start_with(|c| c.auth_cache_ms = 500).await;
    let device = hub.create_device("lost").await;
    let old = device_token("lost", &primary_key(&device));
    assert_eq!(device_call(&hub.base, "lost", &old).await.status(), 204);
    set_key_silently(&hub.db, "lost", &sas::generate_key()).await;
    eventually_answers(401, "the old key once its entry expired", || {
        device_call(&hub.base, "lost", &old)
    })
    .await;
}
