//! The SQL surface's doors besides PostgreSQL: `meshguard sql "SELECT …"` and the HTTP API
//! (`POST /api/sql`, `GET /api/attempts`). The tables and the read-only rule are
//! `meshguard_analytics::sql`'s.

use std::io::Write as _;

use anyhow::Context as _;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshguard_analytics::sql::output::{Format, render};
use meshguard_analytics::sql::{SqlError, SqlSources, SqlSurface};

use crate::config::Config;

/// `meshguard sql`: runs one query over the archive in `archive` (default `archive.dir`) and
/// prints the result. Sees the files the workers have closed (at every checkpoint).
pub async fn cli(cfg: &Config, query: &str, format: Format, archive: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    // `--archive DIR` names another archive: its audit trail is the one beside it.
    let audit = archive.as_ref().map(|dir| dir.join("audit"));
    let dir = archive.unwrap_or_else(|| cfg.archive.dir.clone());
    if !dir.is_dir() {
        anyhow::bail!("no archive at {} (set --archive DIR or archive.dir to the folder `meshguard run` writes)", dir.display());
    }
    let sources = with_audit(SqlSources { archive_dir: dir, ..Default::default() }, cfg, audit);
    let surface = SqlSurface::new(&sources).await.context("opening the archive")?;
    let (schema, batches) = surface.query(query).await?;
    let bytes = render(format, &schema, &batches)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    out.flush()?;
    Ok(())
}

/// `sources` with the enforcer's audit trail as the `audit` table: `dir`, or `enforcer.audit.dir`
/// (which defaults to `<archive.dir>/audit`).
pub fn with_audit(sources: SqlSources, cfg: &Config, dir: Option<std::path::PathBuf>) -> SqlSources {
    let dir = dir.or_else(|| cfg.enforcer.audit.dir.clone()).unwrap_or_else(|| sources.archive_dir.join("audit"));
    sources.with_audit(dir, meshguard_enforcer::audit_schema())
}

/// `POST /api/sql` body when sent as JSON; a plain-text body is the query itself.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
    #[serde(default)]
    format: Option<String>,
}

/// `?format=` of `POST /api/sql`.
#[derive(Debug, serde::Deserialize)]
struct FormatParam {
    format: Option<String>,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], serde_json::json!({ "error": message.to_string() }).to_string()).into_response()
}

async fn answer(surface: &SqlSurface, sql: &str, format: Format) -> Response {
    match surface.query(sql).await {
        Ok((schema, batches)) => match render(format, &schema, &batches) {
            Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        Err(e @ SqlError::Refused(_)) => error(StatusCode::FORBIDDEN, e),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// `POST /api/sql`: the body is the query (text), or `{"sql": "...", "format": "..."}` (JSON);
/// the format (`json` by default, `csv`, `arrow`, `table`) from the body or `?format=`.
async fn post_sql(State(surface): State<SqlSurface>, Query(param): Query<FormatParam>, headers: HeaderMap, body: String) -> Response {
    let is_json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    let (sql, format) = if is_json {
        match serde_json::from_str::<SqlRequest>(&body) {
            Ok(r) => (r.sql, r.format.or(param.format)),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("expected {{\"sql\": \"...\", \"format\": \"json\"}}: {e}")),
        }
    } else {
        (body, param.format)
    };
    let format = match format.as_deref().unwrap_or("json").parse::<Format>() {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if sql.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "the request has no SQL");
    }
    answer(&surface, &sql, format).await
}

/// `GET /api/attempts` parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AttemptsQuery {
    /// The UUID attempts were made against.
    target: uuid::Uuid,
    /// Only findings detected at or after this time: RFC 3339 or epoch milliseconds.
    since: Option<String>,
    /// At most this many rows (default 1000).
    limit: Option<u32>,
    /// `json` (default), `csv`, `arrow`, `table`.
    format: Option<String>,
}

fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("`since` must be RFC 3339 or epoch milliseconds, found {s:?} ({e})"))
}

/// `GET /api/attempts?target=UUID&since=…`: the unauthorized attempts made against `target`, newest
/// first: every finding naming it as target, with the attempt's kind, offender, action and rule.
async fn get_attempts(State(surface): State<SqlSurface>, Query(q): Query<AttemptsQuery>) -> Response {
    let since = match q.since.as_deref().map(parse_time).transpose() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let format = match q.format.as_deref().unwrap_or("json").parse::<Format>() {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // Both values are typed (a parsed UUID, an integer): nothing of the request reaches the SQL as text.
    let since = since.map(|ms| format!(" AND ts >= to_timestamp_millis({ms})")).unwrap_or_default();
    let sql = format!(
        "SELECT event_ts, kind, offender, action, rule, detail, severity, event_id, id AS finding, ts AS detected \
         FROM findings WHERE target = '{}'{since} ORDER BY event_ts DESC, id LIMIT {}",
        q.target.hyphenated(),
        q.limit.unwrap_or(1000)
    );
    answer(&surface, &sql, format).await
}

/// The routes of the SQL surface.
pub fn routes(surface: SqlSurface) -> axum::Router {
    axum::Router::new()
        .route("/api/sql", axum::routing::post(post_sql))
        .route("/api/attempts", axum::routing::get(get_attempts))
        .with_state(surface)
}
