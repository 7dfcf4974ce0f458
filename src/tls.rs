//! rustls configuration for the hub's TLS listeners: TLS 1.2 and 1.3 with rustls' safe defaults only. Shared by
//! every way in (HTTPS, and MQTT over TLS), so it sits beside them, not inside one.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What a TLS listener carries, which decides the ALPN protocols it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTPS (and MQTT over WebSockets on it).
    Http,
    /// MQTT over TLS.
    Mqtt,
}

/// Whether a TLS listener has a certificate to serve with; a listener without one is not bound. Decided here, beside
/// [`listener_config`], so where certificates come from is one place.
pub fn available(cert: Option<&Path>, key: Option<&Path>) -> bool {
    cert.is_some() && key.is_some()
}

/// The TLS configuration of a listener for `protocol`: the configured certificate and key, or `None` when none is
/// configured (that listener is then not started). The one place that decides which certificate a listener uses.
pub fn listener_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    protocol: Protocol,
) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    match (cert, key) {
        (Some(cert), Some(key)) => server_config(cert, key, protocol).map(Some),
        _ => Ok(None),
    }
}

pub fn server_config(
    cert: &Path,
    key: &Path,
    protocol: Protocol,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read the certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a PEM private key from {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = match protocol {
        // HTTP/1.1 only: the SDKs speak it, and it keeps response header names in the exact case they expect.
        Protocol::Http => vec![b"http/1.1".to_vec()],
        // None: MQTT clients rarely offer ALPN, and one that does (e.g. "mqtt") must not be refused for it.
        Protocol::Mqtt => Vec::new(),
    };
    Ok(Arc::new(config))
}
