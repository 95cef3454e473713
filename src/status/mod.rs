//! The status page for people who would rather look than read: `GET /` on the HTTP port, a single
//! self-contained HTML page (no outside assets) that polls `GET /api/status` every two seconds:
//! events/s, findings by kind, recent findings, top offenders and enforcement states. The JSON
//! comes from the same read-only SQL surface as everything else, plus the worker's live counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use meshguard_analytics::sql::SqlSurface;
use serde_json::{Value, json};

use crate::pipeline::LiveStats;

/// What `/api/status` reads.
#[derive(Clone)]
pub struct StatusSources {
    /// The SQL surface.
    pub sql: SqlSurface,
    /// The worker's counters.
    pub stats: Arc<LiveStats>,
    /// Events per second over the last second, as `f64` bits (see [`spawn_rate_sampler`]).
    pub rate: Arc<AtomicU64>,
}

/// Samples `stats.records` every second into `rate` (events/s), until the runtime stops.
pub fn spawn_rate_sampler(stats: Arc<LiveStats>) -> Arc<AtomicU64> {
    let rate = Arc::new(AtomicU64::new(0f64.to_bits()));
    let out = rate.clone();
    tokio::spawn(async move {
        let mut last = (Instant::now(), stats.records.load(Ordering::Relaxed));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = (Instant::now(), stats.records.load(Ordering::Relaxed));
            let per_s = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64().max(1e-3);
            out.store(per_s.to_bits(), Ordering::Relaxed);
            last = now;
        }
    });
    rate
}

const PAGE: &str = include_str!("page.html");

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// Rows of `sql` as JSON objects.
async fn rows(surface: &SqlSurface, sql: &str) -> Result<Vec<Value>, String> {
    let (schema, batches) = surface.query(sql).await.map_err(|e| e.to_string())?;
    let bytes = meshguard_analytics::sql::output::render(meshguard_analytics::sql::output::Format::Json, &schema, &batches)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

async fn status(State(s): State<StatusSources>) -> Response {
    let queries = [
        "SELECT kind, count(*) AS n FROM findings GROUP BY kind ORDER BY n DESC, kind",
        "SELECT ts, kind, offender, target, rule FROM findings ORDER BY ts DESC, id LIMIT 15",
        "SELECT offender, count(*) AS findings, string_agg(DISTINCT kind, ', ') AS kinds, max(ts) AS last_seen \
         FROM findings GROUP BY offender ORDER BY findings DESC, offender LIMIT 10",
        "SELECT uuid, state, since, until, attempts, reason FROM enforcement_current WHERE state <> 'active' \
         ORDER BY since DESC, uuid LIMIT 20",
        "SELECT state, count(*) AS n FROM enforcement_current GROUP BY state",
    ];
    let mut answers = Vec::with_capacity(queries.len());
    for q in queries {
        match rows(&s.sql, q).await {
            Ok(r) => answers.push(r),
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        }
    }
    let states = answers.pop().unwrap_or_default();
    let count_of = |state: &str| states.iter().find(|r| r["state"] == state).and_then(|r| r["n"].as_i64()).unwrap_or(0);
    let mut it = answers.into_iter();
    let (by_kind, recent, offenders, enforcement) =
        (it.next().unwrap_or_default(), it.next().unwrap_or_default(), it.next().unwrap_or_default(), it.next().unwrap_or_default());
    let total: i64 = by_kind.iter().filter_map(|r| r["n"].as_i64()).sum();
    let body = json!({
        "events_per_second": f64::from_bits(s.rate.load(Ordering::Relaxed)),
        "records": s.stats.records.load(Ordering::Relaxed),
        "dead_letters": s.stats.dead_letters.load(Ordering::Relaxed),
        "findings_total": total,
        "findings_by_kind": by_kind,
        "recent_findings": recent,
        "top_offenders": offenders,
        "enforcement": enforcement,
        "blocked": count_of("blocked"),
        "unregistered": count_of("unregistered"),
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `GET /` and `GET /api/status`.
pub fn routes(sources: StatusSources) -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(page)).route("/api/status", axum::routing::get(status)).with_state(sources)
}
