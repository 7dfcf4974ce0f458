//! Who is calling, and may they: SAS tokens checked against shared access policies and device keys.
//!
//! Every refusal here is an [`Error::Unauthorized`] (IoT Hub's 401002), whatever the reason; the reason goes to the
//! debug log only (never the token itself).

pub mod credentials;
pub mod policies;
pub mod sas;

pub use credentials::Credentials;

use crate::registry::model::Status;
use crate::registry::DeviceId;
use sas::SasToken;

/// What authentication and policy management can refuse, or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused: the text says why, for the log and the caller (never the token itself).
    #[error("{0}")]
    Unauthorized(String),
    /// A well-signed policy token for a device that does not exist.
    #[error("Device {0} not registered")]
    DeviceNotFound(String),
    #[error("Shared access policy {0} not found")]
    PolicyNotFound(String),
    #[error("A policy named {0} already exists")]
    PolicyExists(String),
    #[error("Cannot delete the last policy with RegistryWrite")]
    LastRegistryWriter,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A right a shared access policy can grant (spec §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

impl Right {
    pub const ALL: [Right; 4] = [
        Right::RegistryRead,
        Right::RegistryWrite,
        Right::ServiceConnect,
        Right::DeviceConnect,
    ];
    fn bit(self) -> i16 {
        match self {
            Right::RegistryRead => 1,
            Right::RegistryWrite => 2,
            Right::ServiceConnect => 4,
            Right::DeviceConnect => 8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Right::RegistryRead => "RegistryRead",
            Right::RegistryWrite => "RegistryWrite",
            Right::ServiceConnect => "ServiceConnect",
            Right::DeviceConnect => "DeviceConnect",
        }
    }
}

/// A set of rights, stored as a bit set and written as IoT Hub does: `"RegistryWrite, ServiceConnect"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rights(i16);

impl Rights {
    pub fn of(rights: &[Right]) -> Rights {
        Rights(rights.iter().fold(0, |acc, r| acc | r.bit()))
    }
    pub fn from_bits(bits: i16) -> Rights {
        Rights(bits & 0xf)
    }
    pub fn bits(self) -> i16 {
        self.0
    }
    /// RegistryWrite includes RegistryRead (IoT Hub encodes RegistryWrite as RegistryRead | 2).
    pub fn allows(self, right: Right) -> bool {
        match right {
            Right::RegistryRead => {
                self.0 & (Right::RegistryRead.bit() | Right::RegistryWrite.bit()) != 0
            }
            other => self.0 & other.bit() != 0,
        }
    }
    /// Whether every right in `other` is allowed by these rights.
    pub fn covers(self, other: Rights) -> bool {
        Right::ALL
            .iter()
            .all(|r| !other.has_exactly(*r) || self.allows(*r))
    }
    fn has_exactly(self, right: Right) -> bool {
        self.0 & right.bit() != 0
    }
    /// Parses `"RegistryRead, ServiceConnect"` (any order, any spacing, case-insensitive).
    pub fn parse(text: &str) -> Option<Rights> {
        let mut bits = 0;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let right = Right::ALL
                .iter()
                .find(|r| r.name().eq_ignore_ascii_case(part))?;
            bits |= right.bit();
        }
        (bits != 0).then_some(Rights(bits))
    }
}

impl std::fmt::Display for Rights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = Right::ALL
            .iter()
            .filter(|r| self.has_exactly(**r))
            .map(|r| r.name())
            .collect();
        f.write_str(&names.join(", "))
    }
}

/// A caller authenticated with a shared access policy.
#[derive(Debug, Clone)]
pub struct PolicyCaller {
    pub policy: String,
    pub rights: Rights,
}

impl PolicyCaller {
    /// A policy may see the keys of, create, change or rotate only policies whose rights it holds itself, so a
    /// `registryReadWrite` token cannot mint itself ServiceConnect.
    pub fn may_manage(&self, rights: Rights) -> Result<()> {
        if self.rights.covers(rights) {
            Ok(())
        } else {
            Err(Error::Unauthorized(
                "A policy can only manage policies whose rights it holds itself".into(),
            ))
        }
    }
}

/// How a device call was authenticated: with the device's own key, or with a policy that has DeviceConnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceCredential {
    DeviceKey,
    Policy(String),
}

/// A caller allowed to act as one device.
#[derive(Debug, Clone)]
pub struct DeviceCaller {
    pub device_id: DeviceId,
    pub generation_id: String,
    pub credential: DeviceCredential,
}

fn refuse(reason: &str) -> Error {
    tracing::debug!(reason, "authorization refused");
    Error::Unauthorized(reason.to_string())
}

fn parse_header(header: Option<&str>) -> Result<SasToken> {
    let header = header.ok_or_else(|| refuse("Authorization header missing"))?;
    SasToken::parse(header).map_err(|e| refuse(&e.to_string()))
}

/// Checks a policy token for `right` over the resource `target` (the request path's decoded segments).
pub async fn authorize_policy(
    credentials: &Credentials,
    hostname: &str,
    header: Option<&str>,
    target: &[String],
    right: Right,
) -> Result<PolicyCaller> {
    let token = parse_header(header)?;
    let Some(name) = token.key_name.clone() else {
        return Err(refuse("a device token cannot call service endpoints"));
    };
    let rights = check_policy_token(credentials, hostname, &token, &name, target, right).await?;
    Ok(PolicyCaller {
        policy: name,
        rights,
    })
}

/// Checks a token for acting as `device_id`: the device's own key with a scope naming the device, or a policy with
/// DeviceConnect whose scope covers it. A disabled or unknown device is refused either way.
pub async fn authorize_device(
    credentials: &Credentials,
    hostname: &str,
    header: Option<&str>,
    device_id: &str,
    target: &[String],
) -> Result<DeviceCaller> {
    authorize_device_session(credentials, hostname, header, device_id, target)
        .await
        .map(|session| session.caller)
}

/// A device caller, and how long the token it presented stays valid.
#[derive(Debug, Clone)]
pub struct DeviceSession {
    pub caller: DeviceCaller,
    /// Until the token would be refused as expired, on the database's clock (the skew tolerance included), as of
    /// the check: a connection that outlives its token ends then.
    pub token_valid_for: std::time::Duration,
}

/// As [`authorize_device`], for a connection that lasts: also says how long the token stays valid.
pub async fn authorize_device_session(
    credentials: &Credentials,
    hostname: &str,
    header: Option<&str>,
    device_id: &str,
    target: &[String],
) -> Result<DeviceSession> {
    let token = parse_header(header)?;
    let fresh = credentials.device(device_id).await?;
    let device = fresh.value.as_ref().as_ref();
    let credential = match &token.key_name {
        None => {
            let device = device.ok_or_else(|| refuse("unknown device"))?;
            let (Some(primary), Some(secondary)) = (&device.primary_key, &device.secondary_key)
            else {
                return Err(refuse("the device has no symmetric keys"));
            };
            check_token(&token, primary, secondary, fresh.db_now)?;
            // A device token must name its device: its scope covers the target (which starts with
            // `devices/{id}`) and is at least `{host}/devices/{id}` deep.
            check_scope(&token, hostname, target)?;
            let depth = token
                .resource()
                .map(|s| s.trim_end_matches('/').split('/').count())
                .unwrap_or(0);
            if depth < 3 {
                return Err(refuse("a device token's resource must name the device"));
            }
            DeviceCredential::DeviceKey
        }
        Some(name) => {
            let right = Right::DeviceConnect;
            check_policy_token(credentials, hostname, &token, name, target, right).await?;
            DeviceCredential::Policy(name.clone())
        }
    };
    let device = device.ok_or_else(|| Error::DeviceNotFound(device_id.to_string()))?;
    if device.status != Status::Enabled {
        return Err(refuse("the device is disabled"));
    }
    // A registered device's id is valid: the registry only stores valid ones.
    let device_id = device_id
        .parse()
        .map_err(|_| Error::DeviceNotFound(device_id.to_string()))?;
    // `expired` refuses once the clock is past expiry + skew: the token is good for the whole second before.
    let valid_secs =
        (token.expiry.saturating_add(sas::EXPIRY_SKEW_SECS + 1)).saturating_sub(fresh.db_now);
    Ok(DeviceSession {
        caller: DeviceCaller {
            device_id,
            generation_id: device.generation_id.clone(),
            credential,
        },
        token_valid_for: std::time::Duration::from_secs(valid_secs.max(0) as u64),
    })
}

/// Checks `token`, signed with the key of the policy `name`, for `right` over `target`; returns the policy's rights.
async fn check_policy_token(
    credentials: &Credentials,
    hostname: &str,
    token: &SasToken,
    name: &str,
    target: &[String],
    right: Right,
) -> Result<Rights> {
    let fresh = credentials.policy(name).await?;
    let policy = fresh
        .value
        .as_ref()
        .as_ref()
        .ok_or_else(|| refuse("unknown shared access policy"))?;
    check_token(
        token,
        &policy.primary_key,
        &policy.secondary_key,
        fresh.db_now,
    )?;
    check_scope(token, hostname, target)?;
    if !policy.rights.allows(right) {
        return Err(refuse(&format!(
            "the policy {name} does not grant {}",
            right.name()
        )));
    }
    Ok(policy.rights)
}

fn check_token(token: &SasToken, primary: &str, secondary: &str, db_now: i64) -> Result<()> {
    // Both keys are always tried, so timing does not tell which one (if any) matched.
    let primary_ok = token.signed_by(primary);
    let secondary_ok = token.signed_by(secondary);
    if !(primary_ok | secondary_ok) {
        return Err(refuse("the token's signature does not match"));
    }
    if token.expired(db_now) {
        return Err(refuse("the token has expired"));
    }
    Ok(())
}

fn check_scope(token: &SasToken, hostname: &str, target: &[String]) -> Result<()> {
    let scope = token
        .resource()
        .ok_or_else(|| refuse("the token's resource is not valid UTF-8"))?;
    let encoded: Vec<String> = target.iter().map(|s| sas::encode_component(s)).collect();
    if sas::scope_covers(&scope, hostname, &[target.to_vec(), encoded]) {
        Ok(())
    } else {
        Err(refuse("the token's resource does not cover this request"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_render_in_canonical_order() {
        let r = Rights::parse("DeviceConnect,  registrywrite,ServiceConnect").unwrap();
        assert_eq!(
            r.to_string(),
            "RegistryWrite, ServiceConnect, DeviceConnect"
        );
        assert!(r.allows(Right::RegistryRead));
        assert!(Rights::parse("Nope").is_none());
        assert!(Rights::parse("").is_none());
    }

    #[test]
    fn covers_compares_rights_sets() {
        let owner = Rights::of(&[
            Right::RegistryWrite,
            Right::ServiceConnect,
            Right::DeviceConnect,
        ]);
        let rw = Rights::of(&[Right::RegistryRead, Right::RegistryWrite]);
        assert!(owner.covers(rw));
        assert!(!rw.covers(owner));
        assert!(rw.covers(Rights::of(&[Right::RegistryRead])));
    }
}
