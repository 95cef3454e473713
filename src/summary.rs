//! What a person watching sees: a live one-line summary on stdout every second, a final summary,
//! and `/metrics` for Prometheus.
#![allow(clippy::print_stdout, reason = "this module is the command's human output")]

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::routing::get;
use meshguard_schemas::FindingKind;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::pipeline::{LiveStats, findings_by_kind};

/// The control API's way to Kafka: `POST /api/block` and `/api/unblock` publish on the control
/// topic, as `meshguard block` and `unblock` do.
#[derive(Clone)]
pub struct ControlApi {
    /// The producer.
    pub sink: Arc<meshguard_ingest::KafkaSink>,
    /// The control topic.
    pub topic: String,
}

/// `POST /api/block` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockRequest {
    uuid: uuid::Uuid,
    /// Seconds; absent: until unblocked.
    #[serde(default)]
    for_s: Option<u64>,
    #[serde(default)]
    reason: String,
}

/// `POST /api/unblock` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UnblockRequest {
    uuid: uuid::Uuid,
    #[serde(default)]
    reason: String,
}

/// Serves `GET /metrics`; with `control`, `POST /api/block` and `POST /api/unblock`; with `sql`,
/// `POST /api/sql` and `GET /api/attempts`, and with `stats` too the status page (`GET /` and
/// `GET /api/status`); on `addr` in the background. With `token`, every
/// request needs `Authorization: Bearer <token>` (configuration refuses a non-loopback address
/// without one).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    control: Option<ControlApi>,
    sql: Option<meshguard_analytics::sql::SqlSurface>,
    stats: Option<Arc<LiveStats>>,
    token: Option<meshguard_enforcer::Secret>,
) -> anyhow::Result<()> {
    use axum::http::StatusCode;
    let mut app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = Vec::new();
                let encoder = TextEncoder::new();
                let _ = encoder.encode(&registry.gather(), &mut body);
                ([(axum::http::header::CONTENT_TYPE, encoder.format_type().to_owned())], body)
            }
        }),
    );
    if let Some(api) = control {
        let publish = move |cmd: meshguard_schemas::output::ControlCommand| -> (StatusCode, String) {
            let mut key = [0u8; 36];
            let key = cmd.uuid.hyphenated().encode_lower(&mut key).to_owned();
            let sent = serde_json::to_vec(&cmd)
                .map_err(anyhow::Error::from)
                .and_then(|payload| api.sink.send(&api.topic, key.as_bytes(), &payload).map_err(anyhow::Error::from))
                .and_then(|()| api.sink.flush(Duration::from_secs(10)).map_err(anyhow::Error::from));
            match sent {
                Ok(()) => (StatusCode::ACCEPTED, serde_json::json!({ "published": cmd }).to_string()),
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": format!("{e:#}") }).to_string()),
            }
        };
        let command = |uuid, command, until, reason| meshguard_schemas::output::ControlCommand {
            id: uuid::Uuid::new_v4(),
            ts: chrono::Utc::now().timestamp_millis(),
            uuid,
            command,
            until,
            reason,
        };
        let block = publish.clone();
        app = app
            .route(
                "/api/block",
                axum::routing::post(move |axum::Json(r): axum::Json<BlockRequest>| async move {
                    let until = r.for_s.map(|s| chrono::Utc::now().timestamp_millis() + (s as i64) * 1000);
                    block(command(r.uuid, meshguard_schemas::output::ControlAction::Block, until, r.reason))
                }),
            )
            .route(
                "/api/unblock",
                axum::routing::post(move |axum::Json(r): axum::Json<UnblockRequest>| async move {
                    publish(command(r.uuid, meshguard_schemas::output::ControlAction::Unblock, None, r.reason))
                }),
            );
    }
    if let Some(surface) = sql {
        if let Some(stats) = stats {
            let rate = crate::status::spawn_rate_sampler(stats.clone());
            app = app.merge(crate::status::routes(crate::status::StatusSources { sql: surface.clone(), stats, rate }));
        }
        app = app.merge(crate::sql::routes(surface));
    }
    if let Some(token) = token {
        let expected = format!("Bearer {}", token.expose());
        app = app.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let ok = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(expected.as_str());
            async move {
                if ok {
                    next.run(req).await
                } else {
                    axum::response::IntoResponse::into_response((StatusCode::UNAUTHORIZED, "a bearer token is required (http.token)\n"))
                }
            }
        }));
    }
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} (http.listen)"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

/// Serves `GET /metrics` only (the enforcer service alone).
pub async fn serve_metrics(addr: SocketAddr, registry: Registry, token: Option<meshguard_enforcer::Secret>) -> anyhow::Result<()> {
    serve(addr, registry, None, None, None, token).await
}

fn kinds_line(stats: &LiveStats) -> String {
    let mut by_kind: Vec<(FindingKind, u64)> = findings_by_kind(stats).into_iter().collect();
    by_kind.sort_by_key(|(k, _)| k.code());
    if by_kind.is_empty() {
        return "none yet".into();
    }
    by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

/// Prints `events/s` and findings by kind every second until `stop`.
pub fn spawn_printer(stats: Arc<LiveStats>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = (Instant::now(), stats.records.load(Ordering::Relaxed));
        while !stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(Duration::from_secs(1));
            let now = (Instant::now(), stats.records.load(Ordering::Relaxed));
            let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64().max(1e-3);
            last = now;
            println!(
                "{:>9.0} events/s | {} records, {} dead-lettered | findings: {}",
                rate,
                now.1,
                stats.dead_letters.load(Ordering::Relaxed),
                kinds_line(&stats)
            );
            let _ = std::io::stdout().flush();
        }
    })
}

/// Prints how many records were published every second until `stop`.
pub fn spawn_sent_printer(sent: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(Duration::from_secs(1));
            eprintln!("meshguard: published {} records", sent.load(Ordering::Relaxed));
        }
    })
}

/// The closing summary.
pub fn print_final(stats: &LiveStats) {
    println!(
        "meshguard: {} records read, {} dead-lettered, {} checkpoints; findings: {}",
        stats.records.load(Ordering::Relaxed),
        stats.dead_letters.load(Ordering::Relaxed),
        stats.checkpoints.load(Ordering::Relaxed),
        kinds_line(stats)
    );
}
