//! HTTPS beside plain HTTP: SDKs that insist on TLS connect to the hub directly.

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use reqwest::Method;

struct Pki {
    ca_pem: String,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
}

/// A CA and a server certificate for localhost and 127.0.0.1 (CA:FALSE, as rustls clients require).
fn make_pki(dir: &std::path::Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.is_ca = IsCa::ExplicitNoCa;
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_path,
        key_path,
    }
}

#[tokio::test]
async fn the_registry_answers_over_tls_with_modern_protocols_only() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tls-{}", uuid::Uuid::new_v4()));
    let pki = make_pki(&dir);
    let hub = TestHub::start_with(|c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = Some(pki.cert_path.clone());
        c.tls_key = Some(pki.key_path.clone());
    })
    .await;
    hub.create_device("secure-1").await;
    let tls_addr = hub.running().tls_addr.unwrap();
    let token = hub.owner().await;

    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca.clone())
        .build()
        .unwrap();
    let response = client
        .request(
            Method::GET,
            format!(
                "https://127.0.0.1:{}/devices/secure-1?api-version=2021-04-12",
                tls_addr.port()
            ),
        )
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert!(response.headers().contains_key("etag"));

    // TLS 1.2 at the least; nothing older is negotiated.
    let tls12 = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    let response = tls12
        .get(format!("https://localhost:{}/health/live", tls_addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A client that does not trust the certificate cannot talk to it.
    let untrusting = reqwest::Client::builder().use_rustls_tls().build().unwrap();
    assert!(untrusting
        .get(format!("https://127.0.0.1:{}/health/live", tls_addr.port()))
        .send()
        .await
        .is_err());

    // Plain HTTP keeps working beside it.
    let response = hub
        .request(Method::GET, "/devices/secure-1", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_missing_or_bad_certificate_is_a_clear_error() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tls-bad-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing =
        iothub::http::tls::server_config(&dir.join("nope.pem"), &dir.join("nope.key")).unwrap_err();
    assert!(format!("{missing:#}").contains("nope.pem"), "{missing:#}");
    std::fs::write(dir.join("junk.pem"), "not a certificate").unwrap();
    let junk =
        iothub::http::tls::server_config(&dir.join("junk.pem"), &dir.join("junk.pem")).unwrap_err();
    assert!(!format!("{junk:#}").is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

/// One raw HTTP/1.1 exchange over TLS, returning the response exactly as written.
async fn raw_tls(addr: std::net::SocketAddr, ca_pem: &str, request: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn header_case_is_kept_both_ways_over_tls() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tls-case-{}", uuid::Uuid::new_v4()));
    let pki = make_pki(&dir);
    let hub = TestHub::start_with(|c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = Some(pki.cert_path.clone());
        c.tls_key = Some(pki.key_path.clone());
    })
    .await;
    let device = hub.create_device("tls-case").await;
    let token = device_token("tls-case", &primary_key(&device));
    let addr = hub.running().tls_addr.unwrap();
    let body = "{}";
    let sent = raw_tls(
        addr,
        &pki.ca_pem,
        &format!(
            "POST /devices/tls-case/messages/events?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: {token}\r\niothub-app-MixedCase: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(sent.starts_with("HTTP/1.1 204"), "{sent}");
    let owner = hub.owner().await;
    let properties: Vec<serde_json::Value> = hub
        .events()
        .await
        .iter()
        .map(|e| e["properties"].clone())
        .collect();
    assert_eq!(properties, vec![serde_json::json!({"MixedCase": "1"})]);

    let read = raw_tls(
        addr,
        &pki.ca_pem,
        &format!(
            "GET /devices/tls-case?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {owner}\r\n\
             Connection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(read.contains("\r\nETag: \""), "{read}");
    let _ = std::fs::remove_dir_all(dir);
}
