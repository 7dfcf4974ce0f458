//! Just enough of the NATS client protocol (text over TCP) to publish to a JetStream stream and wait for each
//! acknowledgement: a baseline for acknowledged telemetry, without a client crate for one benchmark.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Figures, Latencies};

const VARIABLE: &str = "NATS_URL";
const STREAM: &str = "IOTHUB_BENCH";

/// The NATS server named by `NATS_URL` (e.g. `nats://127.0.0.1:4222`) when one answers there, or why there is none
/// to measure.
pub fn server() -> Result<SocketAddr, String> {
    let url = super::baseline_url(VARIABLE)?;
    let name = super::without_credentials(&url);
    let unreachable = |why: String| format!("cannot connect to {name} ({VARIABLE}): {why}");
    let addr = url
        .trim_start_matches("nats://")
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".to_string()))?;
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(addr)
}

struct Connection {
    stream: TcpStream,
    buffer: BytesMut,
}

impl Connection {
    async fn open(addr: SocketAddr, inbox: &str) -> anyhow::Result<Connection> {
        let mut connection = Connection {
            stream: TcpStream::connect(addr).await?,
            buffer: BytesMut::with_capacity(4096),
        };
        connection.stream.set_nodelay(true)?;
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {inbox} 1\r\nPING\r\n"
        );
        connection.stream.write_all(connect.as_bytes()).await?;
        // INFO first, then PONG once the subscription is in place.
        while connection.line().await? != "PONG" {}
        Ok(connection)
    }

    async fn publish(&mut self, subject: &str, reply: &str, payload: &[u8]) -> anyhow::Result<()> {
        let mut packet = format!("PUB {subject} {reply} {}\r\n", payload.len()).into_bytes();
        packet.extend_from_slice(payload);
        packet.extend_from_slice(b"\r\n");
        self.stream.write_all(&packet).await?;
        Ok(())
    }

    /// The next message's payload; answers the server's PINGs on the way.
    async fn message(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            let line = self.line().await?;
            if line == "PING" {
                self.stream.write_all(b"PONG\r\n").await?;
                continue;
            }
            if let Some(rest) = line.strip_prefix("MSG ") {
                let size: usize = rest.split_whitespace().last().unwrap_or("").parse()?;
                while self.buffer.len() < size + 2 {
                    self.fill().await?;
                }
                let payload = self.buffer[..size].to_vec();
                self.buffer.advance(size + 2);
                return Ok(payload);
            }
            if line.starts_with("-ERR") {
                anyhow::bail!("NATS: {line}");
            }
        }
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
                self.buffer.advance(end + 2);
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.stream.read_buf(&mut self.buffer).await? == 0 {
            anyhow::bail!("NATS closed the connection");
        }
        Ok(())
    }

    /// A JetStream API request and its answer.
    async fn request(&mut self, subject: &str, body: &str) -> anyhow::Result<String> {
        self.publish(subject, "_INBOX.bench.admin", body.as_bytes())
            .await?;
        Ok(String::from_utf8_lossy(&self.message().await?).into_owned())
    }
}

/// `publishers` connections, each publishing with `window` acknowledgements outstanding, to a file-backed
/// stream created for the run and deleted after it.
pub async fn publish_acked(
    addr: SocketAddr,
    payload: fn(u64) -> String,
    publishers: usize,
    window: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let mut admin = Connection::open(addr, "_INBOX.bench.admin").await?;
    let _ = admin
        .request(&format!("$JS.API.STREAM.DELETE.{STREAM}"), "")
        .await?;
    let config = format!(r#"{{"name":"{STREAM}","subjects":["iothub-bench.>"],"storage":"file"}}"#);
    let created = admin
        .request(&format!("$JS.API.STREAM.CREATE.{STREAM}"), &config)
        .await?;
    anyhow::ensure!(
        !created.contains("\"error\""),
        "stream not created: {created}"
    );

    let t0 = Instant::now();
    let deadline = t0 + duration;
    let acked = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (acked, latencies) = (acked.clone(), latencies.clone());
        let inbox = format!("_INBOX.bench.{p}");
        let mut connection = Connection::open(addr, &inbox).await?;
        tasks.push(tokio::spawn(async move {
            let subject = format!("iothub-bench.device-{p}");
            // Acknowledgements come in publish order on one connection.
            let mut sent_at = std::collections::VecDeque::with_capacity(window);
            let mut i = 0u64;
            loop {
                while sent_at.len() < window && Instant::now() < deadline {
                    sent_at.push_back(Instant::now());
                    connection
                        .publish(&subject, &inbox, payload(i).as_bytes())
                        .await?;
                    i += 1;
                }
                let Some(started) = sent_at.pop_front() else {
                    return anyhow::Ok(());
                };
                let ack = connection.message().await?;
                anyhow::ensure!(ack.starts_with(b"{\"stream\""), "not an ack: {ack:?}");
                latencies.record(started.elapsed().as_micros() as u64);
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = t0.elapsed();
    admin
        .request(&format!("$JS.API.STREAM.DELETE.{STREAM}"), "")
        .await?;
    Ok(Figures {
        cycles: acked.load(Ordering::Relaxed),
        elapsed,
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    })
}
