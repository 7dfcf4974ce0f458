//! With no certificate configured, TLS listeners present a certificate of the hub's local CA, and a device needs
//! only `<data dir>/tls/ca.pem` to trust the hub.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use iothub::tls::LocalCa;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

fn data_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", uuid::Uuid::new_v4()))
}

/// A hub with an HTTPS listener and no certificate configured, its data under `dir`.
async fn hub_with_local_ca(dir: &Path, hostname: &str) -> TestHub {
    let (dir, hostname) = (dir.to_path_buf(), hostname.to_string());
    TestHub::start_with(move |c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.data_dir = dir;
        c.hostname = hostname;
    })
    .await
}

/// A TLS handshake with `addr` naming the server `name`, trusting only `ca_pem`: the ALPN protocol it agreed on.
async fn handshake(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    name: &str,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let stream = connector.connect(name, tcp).await?;
    Ok(stream.get_ref().1.alpn_protocol().map(|p| p.to_vec()))
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_client_trusting_only_ca_pem_reaches_the_hub_by_each_of_its_names() {
    let dir = data_dir("local-ca");
    let hub = hub_with_local_ca(&dir, HOST).await;
    let addr = hub.running().tls_addr.unwrap();
    let ca_pem = std::fs::read_to_string(dir.join("tls/ca.pem")).unwrap();
    assert!(
        ca_pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{ca_pem}"
    );
    for name in [HOST, "localhost", "127.0.0.1", "::1"] {
        let alpn = handshake(addr, &ca_pem, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]), "{name}");
    }
    assert!(handshake(addr, &ca_pem, "elsewhere.example").await.is_err());
    // The keys are the owner's alone; the CA certificate is for everyone.
    assert_eq!(mode(&dir.join("tls/ca.key")), 0o600);
    assert_eq!(mode(&dir.join("tls/server.pem")), 0o600);
    assert_eq!(mode(&dir.join("tls/ca.pem")), 0o644);

    // An HTTP client trusting that file alone is served.
    let hub_device = hub.create_device("ca-trusting").await;
    assert_eq!(hub_device["deviceId"], "ca-trusting");
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let response = client
        .get(format!(
            "https://localhost:{}/devices/ca-trusting?api-version=2021-04-12",
            addr.port()
        ))
        .header("Authorization", hub.owner().await)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(hub);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_ca_is_kept_across_restarts_and_a_new_host_name_gets_a_new_server_certificate() {
    let dir = data_dir("local-ca-restart");
    let hub = hub_with_local_ca(&dir, HOST).await;
    let ca_pem = std::fs::read_to_string(dir.join("tls/ca.pem")).unwrap();
    let server_pem = std::fs::read_to_string(dir.join("tls/server.pem")).unwrap();
    hub.shutdown().await;

    // Same host name: nothing is created again.
    let hub = hub_with_local_ca(&dir, HOST).await;
    assert_eq!(
        std::fs::read_to_string(dir.join("tls/ca.pem")).unwrap(),
        ca_pem
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("tls/server.pem")).unwrap(),
        server_pem
    );
    hub.shutdown().await;

    // Another host name: the same CA issues a certificate that names it.
    let hub = hub_with_local_ca(&dir, "hub.example.org").await;
    let addr = hub.running().tls_addr.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("tls/ca.pem")).unwrap(),
        ca_pem
    );
    assert_ne!(
        std::fs::read_to_string(dir.join("tls/server.pem")).unwrap(),
        server_pem
    );
    for name in ["hub.example.org", "localhost", "127.0.0.1"] {
        handshake(addr, &ca_pem, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(handshake(addr, &ca_pem, HOST).await.is_err());
    hub.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn processes_starting_together_end_with_one_ca_and_whole_files() {
    let dir = data_dir("local-ca-race");
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let results: Vec<(String, String)> = (0..8)
        .map(|_| {
            let (dir, barrier) = (dir.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let ca = LocalCa::open(&dir).unwrap();
                let (certs, _key) = ca.server_certificate("race.example").unwrap();
                (ca.ca_pem().to_string(), format!("{:?}", certs[0]))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(results.iter().all(|(ca, _)| *ca == results[0].0));
    // Whatever is on disk now is one whole, valid pair from that CA, and no temporary file is left.
    let ca = LocalCa::open(&dir).unwrap();
    assert_eq!(ca.ca_pem(), results[0].0);
    assert_eq!(
        std::fs::read_to_string(dir.join("tls/ca.pem")).unwrap(),
        results[0].0
    );
    let on_disk = format!("{:?}", ca.server_certificate("race.example").unwrap().0[0]);
    assert!(results.iter().any(|(_, cert)| *cert == on_disk));
    let mut names: Vec<String> = std::fs::read_dir(dir.join("tls"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.key", "ca.pem", "server.pem"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn iothub_ca_prints_the_ca_certificate() {
    let dir = data_dir("local-ca-cli");
    let by_flag = std::process::Command::new(env!("CARGO_BIN_EXE_iothub"))
        .args(["ca", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(by_flag.status.success(), "{by_flag:?}");
    let printed = String::from_utf8(by_flag.stdout).unwrap();
    assert_eq!(
        printed,
        std::fs::read_to_string(dir.join("tls/ca.pem")).unwrap()
    );
    assert!(printed.starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert!(!printed.contains("PRIVATE KEY"));
    // IOTHUB_DATA_DIR names the same folder; the hub then serves with that very CA.
    let by_env = std::process::Command::new(env!("CARGO_BIN_EXE_iothub"))
        .arg("ca")
        .env("IOTHUB_DATA_DIR", &dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(by_env.stdout).unwrap(), printed);
    let hub = hub_with_local_ca(&dir, HOST).await;
    handshake(hub.running().tls_addr.unwrap(), &printed, "localhost")
        .await
        .unwrap();
    drop(hub);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_log_names_the_ca_file_and_never_a_key() {
    let database = TestHub::start().await;
    let dir = data_dir("local-ca-log");
    let log = dir.join("hub.log");
    std::fs::create_dir_all(&dir).unwrap();
    let process = HubProcess::start_with(
        &database.database_url(),
        &dir,
        &[("IOTHUB_TLS_LISTEN", "127.0.0.1:0"), ("RUST_LOG", "trace")],
        Some(&log),
    )
    .await;
    // Ready can answer before the TLS listeners are set up; their lines follow.
    wait_until("the hub logs that it serves", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log).is_ok_and(|text| text.contains("iothub is serving"))
        }
    })
    .await;
    process.kill().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&dir.join("tls/ca.pem").display().to_string()),
        "{text}"
    );
    for file in ["ca.key", "server.pem"] {
        let content = std::fs::read_to_string(dir.join("tls").join(file)).unwrap();
        let key_lines = content
            .lines()
            .skip_while(|l| !l.contains("BEGIN PRIVATE KEY"))
            .skip(1)
            .take_while(|l| !l.contains("END PRIVATE KEY"));
        for line in key_lines {
            assert!(!text.contains(line), "{file}'s key is in the log");
        }
    }
    assert!(!text.contains("PRIVATE KEY"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_certificate_without_its_key_is_refused_at_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_iothub"))
        .args([
            "serve",
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            "server.pem",
        ])
        .env_remove("IOTHUB_TLS_KEY")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-key"), "{stderr}");
}
