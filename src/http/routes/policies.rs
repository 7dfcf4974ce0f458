//! Managing shared access policies over REST (an extension: IoT Hub does this through Azure Resource Manager).
//!
//! Needs RegistryWrite. A caller can see the keys of, create, change or rotate only policies whose rights its own
//! policy covers, so a `registryReadWrite` token cannot mint itself ServiceConnect.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::policies::{self, Policy};
use crate::auth::{PolicyCaller, Rights};
use crate::http::error::{ApiError, ApiResult, ErrorBody};
use crate::http::extract::rights::RegistryWrite;
use crate::http::extract::{Json, Path, Service};
use crate::http::{ApiVersion, AppState};
use crate::keys;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_policies))
        .routes(routes!(put_policy, delete_policy))
        .routes(routes!(regenerate_key))
}

/// A shared access policy on the wire (IoT Hub's ARM names). Keys are present only when the caller's own rights
/// cover the policy's.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"keyName": "service", "rights": "ServiceConnect",
    "primaryKey": "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm8=", "secondaryKey": "YmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmE=",
    "connectionString": "HostName=localhost;SharedAccessKeyName=service;SharedAccessKey=Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm8="}))]
pub struct PolicyView {
    pub key_name: String,
    pub rights: String,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub connection_string: Option<String>,
}

fn view(policy: Policy, caller: &PolicyCaller, hostname: &str) -> PolicyView {
    let visible = caller.rights.covers(policy.rights);
    PolicyView {
        key_name: policy.name.clone(),
        rights: policy.rights.to_string(),
        connection_string: visible.then(|| policy.connection_string(hostname)),
        primary_key: visible.then(|| policy.primary_key.clone()),
        secondary_key: visible.then_some(policy.secondary_key),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct PolicyNamePath {
    /// The policy's name: 1–64 letters, digits and `_ - @ .`.
    #[param(pattern = r"^[A-Za-z0-9_\-@.]{1,64}$")]
    pub name: String,
}

/// List the hub's shared access policies.
#[utoipa::path(get, path = "/policies", tag = "policies",
    params(ApiVersion),
    responses(
        (status = 200, description = "The policies", body = [PolicyView]),
    ),
    security(("sas" = ["RegistryWrite"])))]
async fn list_policies(
    caller: Service<RegistryWrite>,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<PolicyView>>> {
    let all = policies::list(&state.db).await?;
    Ok(Json(
        all.into_iter()
            .map(|p| view(p, &caller.caller, &state.config.hostname))
            .collect(),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInput {
    /// Comma-separated rights: `RegistryRead`, `RegistryWrite`, `ServiceConnect`, `DeviceConnect`.
    pub rights: String,
    /// Base64 of 16–64 bytes; generated when absent.
    #[serde(default)]
    pub primary_key: Option<String>,
    #[serde(default)]
    pub secondary_key: Option<String>,
}

fn checked_name(name: &str) -> ApiResult<&str> {
    if policies::valid_name(name) {
        Ok(name)
    } else {
        Err(ApiError::invalid(
            "Policy names are 1-64 letters, digits and _ - @ .",
        ))
    }
}

/// The policy named `name`, when the caller may manage it.
async fn managed(state: &AppState, caller: &PolicyCaller, name: &str) -> ApiResult<Policy> {
    let existing = policies::get(&state.db, name)
        .await?
        .ok_or_else(|| crate::auth::Error::PolicyNotFound(name.to_string()))?;
    caller.may_manage(existing.rights)?;
    Ok(existing)
}

/// Create a policy, or change an existing one's rights (and keys, when given).
#[utoipa::path(put, path = "/policies/{name}", tag = "policies",
    params(PolicyNamePath, ApiVersion),
    request_body(content = PolicyInput, example = json!({"rights": "RegistryRead, ServiceConnect"})),
    responses(
        (status = 200, description = "The policy", body = PolicyView),
        (status = 400, description = "Invalid name, rights or key (400004)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryWrite"])))]
async fn put_policy(
    caller: Service<RegistryWrite>,
    State(state): State<AppState>,
    Path(PolicyNamePath { name }): Path<PolicyNamePath>,
    Json(input): Json<PolicyInput>,
) -> ApiResult<Json<PolicyView>> {
    let name = checked_name(&name)?;
    let rights = Rights::parse(&input.rights).ok_or_else(|| {
        ApiError::invalid(
            "rights must list RegistryRead, RegistryWrite, ServiceConnect and/or DeviceConnect",
        )
    })?;
    for key in [&input.primary_key, &input.secondary_key]
        .into_iter()
        .flatten()
    {
        if !keys::valid_key(key) {
            return Err(ApiError::invalid(
                "Keys must be base64 encodings of 16 to 64 bytes",
            ));
        }
    }
    caller.caller.may_manage(rights)?;
    let policy = match policies::get(&state.db, name).await? {
        Some(existing) => {
            caller.caller.may_manage(existing.rights)?;
            policies::update(
                &state.db,
                &*state.credentials,
                name,
                rights,
                input.primary_key.as_deref(),
                input.secondary_key.as_deref(),
            )
            .await?
        }
        None => {
            policies::create(
                &state.db,
                &Policy {
                    name: name.to_string(),
                    rights,
                    primary_key: input.primary_key.unwrap_or_else(keys::generate_key),
                    secondary_key: input.secondary_key.unwrap_or_else(keys::generate_key),
                },
            )
            .await?
        }
    };
    Ok(Json(view(policy, &caller.caller, &state.config.hostname)))
}

/// Delete a policy. The last policy with RegistryWrite cannot be deleted.
#[utoipa::path(delete, path = "/policies/{name}", tag = "policies",
    params(PolicyNamePath, ApiVersion),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "It is the last policy with RegistryWrite (400004)", body = ErrorBody),
        (status = 404, description = "No such policy", body = ErrorBody),
    ),
    security(("sas" = ["RegistryWrite"])))]
async fn delete_policy(
    caller: Service<RegistryWrite>,
    State(state): State<AppState>,
    Path(PolicyNamePath { name }): Path<PolicyNamePath>,
) -> ApiResult<StatusCode> {
    managed(&state, &caller.caller, &name).await?;
    policies::delete(&state.db, &*state.credentials, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegenerateKey {
    /// `primary`, `secondary` or `both`.
    #[schema(pattern = "^(primary|secondary|both)$")]
    pub key: String,
}

/// Replace a policy's primary and/or secondary key with a new random one. Tokens signed with the old key stop
/// working at once.
#[utoipa::path(post, path = "/policies/{name}/regenerateKey", tag = "policies",
    params(PolicyNamePath, ApiVersion),
    request_body(content = RegenerateKey, example = json!({"key": "primary"})),
    responses(
        (status = 200, description = "The policy with its new key", body = PolicyView),
        (status = 400, description = "Unknown key choice (400004)", body = ErrorBody),
        (status = 404, description = "No such policy", body = ErrorBody),
    ),
    security(("sas" = ["RegistryWrite"])))]
async fn regenerate_key(
    caller: Service<RegistryWrite>,
    State(state): State<AppState>,
    Path(PolicyNamePath { name }): Path<PolicyNamePath>,
    Json(input): Json<RegenerateKey>,
) -> ApiResult<Json<PolicyView>> {
    let (primary, secondary) = match input.key.to_ascii_lowercase().as_str() {
        "primary" => (Some(keys::generate_key()), None),
        "secondary" => (None, Some(keys::generate_key())),
        "both" => (Some(keys::generate_key()), Some(keys::generate_key())),
        _ => return Err(ApiError::invalid("key must be primary, secondary or both")),
    };
    let existing = managed(&state, &caller.caller, &name).await?;
    let policy = policies::update(
        &state.db,
        &*state.credentials,
        &name,
        existing.rights,
        primary.as_deref(),
        secondary.as_deref(),
    )
    .await?;
    Ok(Json(view(policy, &caller.caller, &state.config.hostname)))
}
