//! A small client of the hub's REST API, for the CLI (and handy in tests): signs its own SAS tokens from a
//! connection string.

use anyhow::{bail, Context};
use reqwest::{Method, StatusCode};

use crate::auth::sas;
use crate::http::routes::registry::Device;

pub const API_VERSION: &str = "2021-04-12";

/// `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...` or a device's `...;DeviceId=...;SharedAccessKey=...`.
#[derive(Clone)]
pub struct ConnectionString {
    pub host_name: String,
    pub key_name: Option<String>,
    pub device_id: Option<String>,
    pub key: String,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl ConnectionString {
    pub fn parse(text: &str) -> anyhow::Result<ConnectionString> {
        let (mut host, mut key_name, mut device, mut key) = (None, None, None, None);
        for part in text.trim().split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .context("a connection string is key=value pairs separated by ';'")?;
            match k {
                "HostName" => host = Some(v.to_string()),
                "SharedAccessKeyName" => key_name = Some(v.to_string()),
                "DeviceId" => device = Some(v.to_string()),
                "SharedAccessKey" => key = Some(v.to_string()),
                _ => {}
            }
        }
        Ok(ConnectionString {
            host_name: host.context("the connection string has no HostName")?,
            key_name,
            device_id: device,
            key: key.context("the connection string has no SharedAccessKey")?,
        })
    }

    /// A token for the whole hub (policy) or for the device, valid for `ttl_secs`.
    pub fn token(&self, ttl_secs: i64) -> anyhow::Result<String> {
        let expiry = chrono::Utc::now().timestamp() + ttl_secs;
        let resource = match &self.device_id {
            Some(id) => format!("{}/devices/{}", self.host_name, id),
            None => self.host_name.clone(),
        };
        sas::sign(&resource, &self.key, self.key_name.as_deref(), expiry)
    }
}

/// The hub's REST API at `base` (e.g. `http://127.0.0.1:8080`), as the holder of `credentials`.
pub struct HubClient {
    pub base: String,
    pub credentials: ConnectionString,
    http: reqwest::Client,
}

impl HubClient {
    pub fn new(base: &str, credentials: ConnectionString) -> anyhow::Result<HubClient> {
        Ok(HubClient {
            base: base.trim_end_matches('/').to_string(),
            credentials,
            http: reqwest::Client::builder().build()?,
        })
    }

    pub fn device_path(id: &str) -> String {
        crate::http::wire::device_path(id)
    }

    /// A request to the hub with `api-version` and a fresh token.
    fn request(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let separator = if path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}{path_and_query}{separator}api-version={API_VERSION}",
            self.base
        );
        Ok(self
            .http
            .request(method, &url)
            .header("Authorization", self.credentials.token(3600)?))
    }

    /// Sends a request and returns the status and body text; errors only when the hub cannot be reached.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, String)> {
        let mut request = self.request(method, path_and_query)?;
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.base))?;
        let status = response.status();
        Ok((status, response.text().await?))
    }

    /// Sends a request with raw headers and body (message calls); errors only when the hub cannot be reached.
    pub async fn call_raw(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut request = self.request(method, path_and_query)?.body(body);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        request
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.base))
    }

    async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<String> {
        let (status, text) = self.call(method, path, body).await?;
        if !status.is_success() {
            bail!("the hub answered {status}: {text}");
        }
        Ok(text)
    }

    pub async fn create_device(&self, id: &str, disabled: bool) -> anyhow::Result<Device> {
        let status = if disabled { "disabled" } else { "enabled" };
        let body = serde_json::json!({"deviceId": id, "status": status});
        let text = self
            .expect(Method::PUT, &Self::device_path(id), Some(body))
            .await?;
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn get_device(&self, id: &str) -> anyhow::Result<Device> {
        let text = self
            .expect(Method::GET, &Self::device_path(id), None)
            .await?;
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn list_devices(&self, top: u32) -> anyhow::Result<Vec<Device>> {
        let text = self
            .expect(Method::GET, &format!("/devices?top={top}"), None)
            .await?;
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn delete_device(&self, id: &str) -> anyhow::Result<()> {
        self.expect(Method::DELETE, &Self::device_path(id), None)
            .await?;
        Ok(())
    }
}
