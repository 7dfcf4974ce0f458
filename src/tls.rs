//! rustls configuration for the hub's TLS listeners: TLS 1.2 and 1.3 with rustls' safe defaults only. Shared by
//! every way in (HTTPS, and MQTT over TLS), so it sits beside them, not inside one.
//!
//! A listener presents the certificate `IOTHUB_TLS_CERT`/`IOTHUB_TLS_KEY` name, or, when none is configured, one
//! issued by a local CA the hub creates under `<data dir>/tls`: devices then need only `ca.pem` to trust the hub.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::Config;

/// What a TLS listener carries, which decides the ALPN protocols it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTPS (and MQTT over WebSockets on it).
    Http,
    /// MQTT over TLS.
    Mqtt,
}

impl Protocol {
    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            // HTTP/1.1 only: the SDKs speak it, and it keeps response header names in the exact case they expect.
            Protocol::Http => vec![b"http/1.1".to_vec()],
            // None: MQTT clients rarely offer ALPN, and one that does (e.g. "mqtt") must not be refused for it.
            Protocol::Mqtt => Vec::new(),
        }
    }
}

/// The TLS configuration of a listener for `protocol`: the configured certificate and key, or else the local CA's.
/// The one place that decides which certificate a listener uses.
pub fn listener_config(
    config: &Config,
    protocol: Protocol,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (certs, key) = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => read_pair(cert, key)?,
        (None, None) => {
            let ca = LocalCa::open(&config.data_dir)?;
            let pair = ca.server_certificate(&config.hostname)?;
            tracing::info!(ca = %ca.ca_pem_path().display(),
                "TLS with the hub's local CA: devices trust this file (`iothub ca` prints it)");
            pair
        }
        _ => anyhow::bail!("IOTHUB_TLS_CERT and IOTHUB_TLS_KEY go together: set both or neither"),
    };
    build(certs, key, protocol)
}

/// The configuration for a certificate chain and key in PEM files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    protocol: Protocol,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (certs, key) = read_pair(cert, key)?;
    build(certs, key, protocol)
}

type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn read_pair(cert: &Path, key: &Path) -> anyhow::Result<Pair> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read the certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a PEM private key from {}", key.display()))?;
    Ok((certs, key))
}

fn build(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    protocol: Protocol,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = protocol.alpn();
    Ok(Arc::new(config))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The hub's own CA under `<data dir>/tls`: `ca.pem` (what devices trust), `ca.key` (its key and certificate,
/// mode 0600) and `server.pem` (the server's key and certificate, 0600). Each file is written whole under a temporary
/// name and then renamed, so hub processes starting together on one data folder never see a torn file.
pub struct LocalCa {
    dir: PathBuf,
    key: rcgen::KeyPair,
    cert_pem: String,
}

/// A server certificate is reissued when it would expire within this time.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
const CA_DAYS: i64 = 3650;
/// The longest lifetime clients such as Apple's accept for a server certificate.
const SERVER_DAYS: i64 = 397;

impl LocalCa {
    /// The CA under `data_dir`, created on first use.
    pub fn open(data_dir: &Path) -> anyhow::Result<LocalCa> {
        let dir = data_dir.join("tls");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the folder {}", dir.display()))?;
        let key_path = dir.join("ca.key");
        if !key_path.exists() {
            let key = rcgen::KeyPair::generate().context("a key for the local CA")?;
            let cert = ca_params(&key)?.self_signed(&key)?;
            // A link does not replace: when two processes create a CA at once, the first one's stays.
            let content = format!("{}{}", key.serialize_pem(), cert.pem());
            write_new(&key_path, content.as_bytes())?;
        }
        let text = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = pem_block(&text, "PRIVATE KEY")
            .and_then(|block| rcgen::KeyPair::from_pem(block).ok())
            .with_context(|| format!("{} holds no usable private key", key_path.display()))?;
        let cert_pem = pem_block(&text, "CERTIFICATE")
            .with_context(|| format!("{} holds no certificate", key_path.display()))?
            .to_string();
        let ca = LocalCa { dir, key, cert_pem };
        if std::fs::read_to_string(ca.ca_pem_path()).ok().as_deref() != Some(&ca.cert_pem) {
            write_replacing(&ca.ca_pem_path(), ca.cert_pem.as_bytes(), 0o644)?;
        }
        Ok(ca)
    }

    /// The file devices trust.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA certificate in PEM.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `hostname`, `localhost`, `127.0.0.1` and `::1` issued by this CA: the stored one
    /// while it is still good for those names for a while, else a new one.
    pub fn server_certificate(&self, hostname: &str) -> anyhow::Result<Pair> {
        let path = self.dir.join("server.pem");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Some(pair) = self.usable(&text, hostname) {
                return Ok(pair);
            }
        }
        let key = rcgen::KeyPair::generate().context("a key for the server certificate")?;
        let names = server_names(hostname);
        let mut params = rcgen::CertificateParams::new(names)
            .with_context(|| format!("{hostname} cannot be a certificate name"))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hostname);
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(SERVER_DAYS);
        let issuer = ca_params(&self.key)?.self_signed(&self.key)?;
        let cert = params.signed_by(&key, &issuer, &self.key)?;
        let text = format!("{}{}", key.serialize_pem(), cert.pem());
        write_replacing(&path, text.as_bytes(), 0o600)?;
        self.usable(&text, hostname)
            .context("the new server certificate does not verify")
    }

    /// The pair in `text` when this CA issued it and it stays valid for the hub's names past [`RENEW_BEFORE`].
    fn usable(&self, text: &str, hostname: &str) -> Option<Pair> {
        let key = PrivateKeyDer::from_pem_slice(pem_block(text, "PRIVATE KEY")?.as_bytes()).ok()?;
        let cert =
            CertificateDer::from_pem_slice(pem_block(text, "CERTIFICATE")?.as_bytes()).ok()?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).ok()?)
            .ok()?;
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .ok()?;
        let later = UnixTime::since_unix_epoch(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                + RENEW_BEFORE,
        );
        for name in server_names(hostname) {
            let name = ServerName::try_from(name).ok()?;
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &cert,
                &[],
                &name,
                &[],
                later,
            )
            .ok()?;
        }
        Some((vec![cert], key))
    }
}

fn server_names(hostname: &str) -> Vec<String> {
    let mut names = vec![hostname.to_string()];
    for name in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.to_string());
        }
    }
    names
}

/// The CA's parameters. Its name is derived from its key, so a server certificate can be issued later from the
/// key alone, and two hubs' CAs never share a name (clients pick a CA by name).
fn ca_params(key: &rcgen::KeyPair) -> anyhow::Result<rcgen::CertificateParams> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.public_key_raw());
    let id: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("iothub local CA {id}"));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(CA_DAYS);
    Ok(params)
}

/// From yesterday (clocks differ a little) for `days`.
fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    use chrono::Datelike;
    let today = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let start = rcgen::date_time_ymd(today.year(), today.month() as u8, today.day() as u8);
    (start, start + time::Duration::days(days))
}

/// The first `-----BEGIN {label}-----` … `-----END {label}-----` block of `text`, markers included.
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = start + text[start..].find(&end)? + end.len();
    Some(&text[start..stop])
}

/// Writes `path` whole, unless it exists (then the existing file wins). Mode 0600: it holds a key.
fn write_new(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let temp = write_temp(path, content, 0o600)?;
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Replaces `path` whole by renaming a complete temporary file over it.
fn write_replacing(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let temp = write_temp(path, content, mode)?;
    std::fs::rename(&temp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn write_temp(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .with_context(|| format!("cannot create {}", temp.display()))?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temp.display()))?;
    Ok(temp)
}
