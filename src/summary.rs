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

/// Serves `GET /metrics` on `addr` in the background.
pub async fn serve_metrics(addr: SocketAddr, registry: Registry) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
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
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} (http.listen)"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
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
