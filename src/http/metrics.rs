//! Prometheus metrics: requests and latency by route template, and the database pool.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder (installed once; several hubs in one test process share it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .expect("static buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder is installed already; ours then stays unused.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("iothub_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("iothub_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// How often recorded latencies are folded into their histogram buckets when nobody scrapes.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded latencies into their buckets every [`UPKEEP_EVERY`] until `stop`. The recorder keeps every
/// sample until it is rendered or kept up, so without this a hub that no one scrapes would grow by every request
/// it answers.
pub async fn upkeep(mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = tick.tick() => {
                handle().run_upkeep();
                // The drained sample blocks are freed by crossbeam's epoch collector, which moves on only when
                // threads pin it: without traffic, the last drain's blocks would wait for the next request.
                crossbeam_epoch::pin().flush();
            }
        }
    }
}

/// Renders the metrics, with the pool's current figures.
pub fn render(pool: &sqlx::PgPool) -> String {
    metrics::gauge!("iothub_db_pool_connections").set(pool.size() as f64);
    metrics::gauge!("iothub_db_pool_idle_connections").set(pool.num_idle() as f64);
    handle().render()
}
