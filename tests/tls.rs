//! HTTPS beside plain HTTP: SDKs that insist on TLS connect to the hub directly.

mod common;

use common::pki;
use common::*;
use reqwest::Method;

#[tokio::test]
async fn the_registry_answers_over_tls_with_modern_protocols_only() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tls-{}", uuid::Uuid::new_v4()));
    let pki = pki::make(&dir);
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
    let missing = iothub::tls::server_config(
        &dir.join("nope.pem"),
        &dir.join("nope.key"),
        iothub::tls::Protocol::Http,
    )
    .unwrap_err();
    assert!(format!("{missing:#}").contains("nope.pem"), "{missing:#}");
    std::fs::write(dir.join("junk.pem"), "not a certificate").unwrap();
    let junk = iothub::tls::server_config(
        &dir.join("junk.pem"),
        &dir.join("junk.pem"),
        iothub::tls::Protocol::Http,
    )
    .unwrap_err();
    assert_eq!(
        format!("{junk:#}"),
        format!("{} holds no certificate", dir.join("junk.pem").display())
    );
    // A good certificate with a key file that holds no key names the key file.
    let pki = pki::make(&dir.join("good"));
    let no_key = iothub::tls::server_config(
        &pki.cert_path,
        &dir.join("junk.pem"),
        iothub::tls::Protocol::Http,
    )
    .unwrap_err();
    assert!(
        format!("{no_key:#}").starts_with(&format!(
            "cannot read a PEM private key from {}",
            dir.join("junk.pem").display()
        )),
        "{no_key:#}"
    );
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
    let pki = pki::make(&dir);
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

/// A hub with an HTTPS listener; its address and the folder of its certificate.
async fn tls_hub(name: &str) -> (TestHub, std::net::SocketAddr, std::path::PathBuf) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", uuid::Uuid::new_v4()));
    let pki = pki::make(&dir);
    let hub = TestHub::start_with(|c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_cert = Some(pki.cert_path.clone());
        c.tls_key = Some(pki.key_path.clone());
    })
    .await;
    let addr = hub.running().tls_addr.unwrap();
    (hub, addr, dir)
}

/// A TLS ClientHello record as a client of the given protocol writes it: `legacy_version` in the hello, and
/// when `supported_versions` is given, that extension (how TLS 1.3 clients list versions). Everything else is
/// what a TLS 1.2 client needs to get an answer from the hub's ECDSA certificate, so only the version differs.
fn client_hello(legacy_version: u16, supported_versions: Option<&[u16]>) -> Vec<u8> {
    fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend((body.len() as u16).to_be_bytes());
        out.extend(body);
        out
    }
    fn list16(items: &[u16]) -> Vec<u8> {
        let mut out = ((items.len() * 2) as u16).to_be_bytes().to_vec();
        for item in items {
            out.extend(item.to_be_bytes());
        }
        out
    }
    let mut extensions = Vec::new();
    extensions.extend(extension(0x000a, &list16(&[0x001d, 0x0017]))); // supported_groups: x25519, P-256
    extensions.extend(extension(0x000b, &[1, 0])); // ec_point_formats: uncompressed
    extensions.extend(extension(0x000d, &list16(&[0x0403, 0x0804, 0x0401]))); // signature_algorithms
    extensions.extend(extension(0x0017, &[])); // extended_master_secret
    extensions.extend(extension(0xff01, &[0])); // renegotiation_info
    if let Some(versions) = supported_versions {
        let mut body = vec![(versions.len() * 2) as u8];
        for version in versions {
            body.extend(version.to_be_bytes());
        }
        extensions.extend(extension(0x002b, &body));
    }
    let mut hello = legacy_version.to_be_bytes().to_vec();
    hello.extend([7u8; 32]); // random
    hello.push(0); // no session id
                   // ECDHE-ECDSA and ECDHE-RSA with AES-GCM (TLS 1.2), and the CBC suites TLS 1.0 and 1.1 clients offer.
    hello.extend(list16(&[0xc02b, 0xc02f, 0xc009, 0xc013, 0x002f]));
    hello.extend([1, 0]); // compression: none
    hello.extend((extensions.len() as u16).to_be_bytes());
    hello.extend(extensions);
    let mut handshake = vec![1u8]; // ClientHello
    handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record, as every client's first record is labelled
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// Sends `hello` on a fresh connection; the first record the hub answers with (type, and its first two bytes).
async fn first_record(addr: std::net::SocketAddr, hello: &[u8]) -> (u8, [u8; 2]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let mut header = [0u8; 7];
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tcp.read_exact(&mut header),
    )
    .await
    .expect("the hub answers the hello")
    .expect("a whole record header and two bytes");
    (header[0], [header[5], header[6]])
}

const HANDSHAKE: u8 = 0x16;
const SERVER_HELLO: u8 = 2;
const ALERT: u8 = 0x15;
const FATAL: u8 = 2;
const PROTOCOL_VERSION: u8 = 70;

#[tokio::test]
async fn tls_1_0_and_1_1_handshakes_are_refused() {
    let (_hub, addr, dir) = tls_hub("tls-old").await;
    // The same hello as TLS 1.2 gets a ServerHello: what follows is refused for its version alone.
    let (kind, body) = first_record(addr, &client_hello(0x0303, None)).await;
    assert_eq!((kind, body[0]), (HANDSHAKE, SERVER_HELLO), "TLS 1.2");
    for (name, hello) in [
        ("TLS 1.0", client_hello(0x0301, None)),
        ("TLS 1.1", client_hello(0x0302, None)),
        // A client listing versions the TLS 1.3 way, but only old ones.
        (
            "TLS 1.1 and 1.0 listed",
            client_hello(0x0303, Some(&[0x0302, 0x0301])),
        ),
    ] {
        let (kind, body) = first_record(addr, &hello).await;
        assert_eq!(
            (kind, body),
            (ALERT, [FATAL, PROTOCOL_VERSION]),
            "{name}: a fatal protocol_version alert"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_client_that_never_starts_the_handshake_is_cut_off() {
    use tokio::io::AsyncReadExt;
    let (hub, addr, dir) = tls_hub("tls-silent").await;
    // TCP open, no ClientHello: the hub closes the connection after its handshake timeout (10 s).
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        silent.read_to_end(&mut out),
    )
    .await;
    assert!(closed.is_ok(), "the silent connection was not closed");
    assert!(out.is_empty(), "{out:?}");
    // Others are served meanwhile and after.
    let response = hub
        .http
        .get(format!("{}/health/live", hub.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = std::fs::remove_dir_all(dir);
}
