//! The zero-configuration start, as a new user runs it: `iothub serve` with no DATABASE_URL creates and supervises
//! its own PostgreSQL under ./data/postgres, keeps data across restarts, and stops the cluster when it stops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_iothub");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A folder PostgreSQL's own user can enter even when the tests run as root.
fn workdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "iothub-zero-config-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn command(dir: &Path, args: &[&str], port: u16) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env("IOTHUB_LISTEN", format!("127.0.0.1:{port}"))
        .env("IOTHUB_HOSTNAME", "zero.example.net")
        // Never IoT Hub's 8883: tests run side by side.
        .env("IOTHUB_MQTTS_LISTEN", "127.0.0.1:0");
    command
}

fn serve(dir: &Path, port: u16) -> Child {
    command(dir, &["serve"], port)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_ready(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/health/ready")).await {
            if r.status() == 200 {
                return;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("iothub serve exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("iothub serve was not ready within 90 s");
}

fn terminate(mut child: Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "iothub serve exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "iothub serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn token(dir: &Path, port: u16) -> String {
    let out = command(dir, &["token"], port).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn serve_with_no_configuration_runs_and_stops_its_own_postgres() {
    let dir = workdir();
    let port = free_port();
    let mut hub = serve(&dir, port);
    wait_ready(port, &mut hub).await;
    let pid_file = dir.join("data/postgres/pgdata/postmaster.pid");
    assert!(pid_file.exists(), "the cluster lives under ./data/postgres");

    // `iothub token` and `iothub policy list` use the running hub's cluster.
    let token = token(&dir, port);
    assert!(
        token.starts_with("SharedAccessSignature sr=zero.example.net&sig="),
        "{token}"
    );
    let out = command(&dir, &["policy", "list"], port).output().unwrap();
    let policies = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = policies.lines().collect();
    assert_eq!(lines.len(), 5, "{policies}");
    assert!(lines[0]
        .starts_with("HostName=zero.example.net;SharedAccessKeyName=iothubowner;SharedAccessKey="));

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/devices/kept?api-version=2021-04-12");
    let response = http
        .put(&url)
        .header("Authorization", &token)
        .json(&serde_json::json!({"deviceId": "kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    terminate(hub);
    assert!(
        !pid_file.exists(),
        "the hub stops its PostgreSQL when it stops"
    );

    // Data survives a restart.
    let mut hub = serve(&dir, port);
    wait_ready(port, &mut hub).await;
    let response = http
        .get(&url)
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    terminate(hub);
    let _ = std::fs::remove_dir_all(dir);
}

/// `docker stop` or a service manager may stop the hub while it is still starting: it must stop as cleanly as a
/// running hub, and take its PostgreSQL with it.
#[tokio::test]
async fn sigterm_while_starting_stops_the_hub_and_its_postgres_cleanly() {
    let dir = workdir();
    let port = free_port();
    let mut hub = serve(&dir, port);
    // The cluster is being created or started: the hub has not served yet.
    let data = dir.join("data/postgres");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data.exists() {
        assert!(
            Instant::now() < deadline,
            "the hub never began its start-up"
        );
        assert!(hub.try_wait().unwrap().is_none(), "the hub exited early");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(hub.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = hub.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the hub did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    let pid_file = data.join("pgdata/postmaster.pid");
    let orphan = std::fs::read_to_string(&pid_file).ok();
    if let Some(pid) = orphan
        .as_deref()
        .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
    {
        // Left running: stop it before failing, so the failure does not outlive the test.
        // SAFETY: kill(2) on the postmaster this test's hub started.
        unsafe { libc::kill(pid, libc::SIGQUIT) };
    }
    assert!(status.success(), "a clean exit after SIGTERM: {status}");
    assert!(
        orphan.is_none(),
        "the hub stops its PostgreSQL when it stops"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unreachable_database_is_a_one_line_error_not_a_panic() {
    let dir = workdir();
    let out = Command::new(BIN)
        .args(["serve"])
        .current_dir(&dir)
        .env(
            "DATABASE_URL",
            "postgres://nobody:secret-password@127.0.0.1:1/none",
        )
        .env("IOTHUB_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("iothub: "), "{stderr}");
    assert!(stderr.contains("cannot connect to PostgreSQL"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("secret-password"),
        "passwords never reach the log: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
