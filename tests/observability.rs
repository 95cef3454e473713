//! Observability, checked against the real tools: the live `/metrics` of a running `meshguard run`
//! passes `promtool check metrics`; the alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`); every Grafana dashboard is well formed; and a real Prometheus on
//! loopback, scraping the running `meshguard run`, answers every Prometheus query of every
//! dashboard with data.
//!
//! These tests need Prometheus and promtool (`bash scripts/install-prometheus.sh`, the Debian
//! package `prometheus`); without them they fail with that instruction, they never skip. Everything
//! they start listens on 127.0.0.1 only and is stopped when the test ends, failed or not.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const PROMETHEUS_ENV: &str = "MESHGUARD_PROMETHEUS_BIN";
const PROMTOOL_ENV: &str = "MESHGUARD_PROMTOOL_BIN";
const INSTALL_HINT: &str = "run `bash scripts/install-prometheus.sh` from the repository root (it installs the Debian package \
     `prometheus`, i.e. `sudo apt-get install prometheus`, which ships prometheus and promtool), or set MESHGUARD_PROMETHEUS_BIN \
     and MESHGUARD_PROMTOOL_BIN";

/// Uids of the provisioned data sources and the template variables the dashboards reach them by.
const PROMETHEUS_UID: &str = "meshguard-prometheus";
const POSTGRES_UID: &str = "meshguard-postgres";
const PROMETHEUS_VAR: &str = "${datasource}";
const POSTGRES_VAR: &str = "${pg_datasource}";

/// Pause between two polls of something that has no event to wait on (an HTTP endpoint).
const POLL: Duration = Duration::from_millis(250);

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// A Prometheus tool from its environment variable, else from `PATH` or `/usr/bin`; a loud failure
/// with the install command when it is nowhere.
fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{env}={} is not a file; {INSTALL_HINT}", path.display());
        return path;
    }
    let dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    dirs.into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found (neither {env} nor PATH); {INSTALL_HINT}"))
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0").local_addr().expect("local address").port()
}

/// A child process stopped when dropped: SIGTERM, up to 10 s to exit, then SIGKILL. Its stderr goes
/// to `log`, printed when the test fails.
struct Guard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Guard {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Guard {
        let file = std::fs::File::create(&log).expect("create the log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({:?}): {e}", cmd.get_program()));
        Guard { name, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails with the log when the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("{} exited early ({status}):\n{}", self.name, self.log());
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} log ({}) ---\n{}", self.name, self.log.display(), self.log());
        }
    }
}

/// Runs `promtool` with `args` in the dashboards directory, optionally feeding `stdin`; returns
/// its combined output, failing the test when it fails.
fn promtool(args: &[&str], stdin: Option<&[u8]>) -> String {
    use std::io::Write as _;
    let mut child = Command::new(tool(PROMTOOL_ENV, "promtool"))
        .args(args)
        .current_dir(dashboards_dir())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} failed ({}):\n{text}", args.join(" "), out.status);
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let out = promtool(&["check", "rules", "alerts.yml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "alerts_test.yml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
    // The example configuration loads the rules next to it.
    promtool(&["check", "config", "prometheus.yml"], None);
    // Every alert the rules define has a unit test.
    let rules = std::fs::read_to_string(dashboards_dir().join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dashboards_dir().join("alerts_test.yml")).unwrap();
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {alert}")), "alert {alert} has no test in alerts_test.yml");
    }
}

/// One panel target: the dashboard, the panel title and the query (PromQL or SQL).
#[derive(Debug)]
struct Query {
    dashboard: String,
    panel: String,
    text: String,
}

/// Every dashboard JSON, parsed.
fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dashboards_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            out.push((path.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 4, "expected the overview, detections, enforcement and pipeline dashboards, found {out:?}");
    out
}

/// Checks the dashboards' structure and returns their Prometheus and SQL queries.
fn check_dashboards() -> (Vec<Query>, Vec<Query>) {
    let (mut prom, mut sql) = (Vec::new(), Vec::new());
    let mut uids = BTreeSet::new();
    for (file, d) in dashboards() {
        let uid = d["uid"].as_str().unwrap_or_else(|| panic!("{file}: no uid"));
        assert!(uid.starts_with("meshguard-") && uids.insert(uid.to_owned()), "{file}: uid {uid} not meshguard-* or repeated");
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}: no title");
        let vars = d["templating"]["list"].as_array().unwrap_or_else(|| panic!("{file}: no template variables"));
        let var = |name: &str| vars.iter().find(|v| v["name"] == name);
        let ds = var("datasource").unwrap_or_else(|| panic!("{file}: no `datasource` variable"));
        assert_eq!((ds["type"].as_str(), ds["query"].as_str()), (Some("datasource"), Some("prometheus")), "{file}: `datasource`");
        assert_eq!(ds["current"]["value"], PROMETHEUS_UID, "{file}: `datasource` must default to the provisioned uid");
        let panels = d["panels"].as_array().unwrap_or_else(|| panic!("{file}: no panels"));
        assert!(!panels.is_empty(), "{file}: no panels");
        let mut ids = BTreeSet::new();
        for p in panels {
            let title = p["title"].as_str().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{file}: a panel without a title: {p}"));
            let at = format!("{file} / {title}");
            assert!(ids.insert(p["id"].as_u64().unwrap_or_else(|| panic!("{at}: no id"))), "{at}: repeated id");
            assert!(p["description"].as_str().is_some_and(|t| !t.is_empty()), "{at}: no description");
            assert!(p["fieldConfig"]["defaults"]["unit"].as_str().is_some_and(|t| !t.is_empty()), "{at}: no unit");
            assert!(p["gridPos"]["w"].as_u64().is_some() && p["gridPos"]["h"].as_u64().is_some(), "{at}: no gridPos");
            let panel_uid = p["datasource"]["uid"].as_str().unwrap_or_else(|| panic!("{at}: no datasource uid"));
            let targets = p["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{at}: no targets"));
            for t in targets {
                let target_uid = t["datasource"]["uid"].as_str().unwrap_or(panel_uid);
                assert_eq!(target_uid, panel_uid, "{at}: a target's data source differs from the panel's");
                match panel_uid {
                    PROMETHEUS_VAR => {
                        assert_eq!(p["datasource"]["type"], "prometheus", "{at}");
                        let expr = t["expr"].as_str().filter(|e| !e.is_empty()).unwrap_or_else(|| panic!("{at}: no expr"));
                        prom.push(Query { dashboard: file.clone(), panel: title.to_owned(), text: expr.to_owned() });
                    }
                    POSTGRES_VAR => {
                        let pg = var("pg_datasource").unwrap_or_else(|| panic!("{file}: SQL panels but no `pg_datasource` variable"));
                        assert_eq!(pg["current"]["value"], POSTGRES_UID, "{file}: `pg_datasource` must default to the provisioned uid");
                        assert_eq!(p["datasource"]["type"], pg["query"], "{at}: data source type");
                        let text = t["rawSql"].as_str().unwrap_or_else(|| panic!("{at}: no rawSql"));
                        assert!(["findings", "enforcement"].iter().any(|table| text.contains(&format!("FROM {table}"))), "{at}: {text}");
                        sql.push(Query { dashboard: file.clone(), panel: title.to_owned(), text: text.to_owned() });
                    }
                    other => panic!("{at}: data source uid {other:?}, expected {PROMETHEUS_VAR} or {POSTGRES_VAR}"),
                }
            }
        }
    }
    (prom, sql)
}

#[test]
fn dashboards_are_well_formed_and_provisioned() {
    let (prom, sql) = check_dashboards();
    assert!(prom.len() >= 30, "{} Prometheus queries", prom.len());
    assert!(!sql.is_empty());
    let sources = std::fs::read_to_string(dashboards_dir().join("provisioning/datasources/meshguard.yml")).unwrap();
    for uid in [PROMETHEUS_UID, POSTGRES_UID] {
        assert!(sources.contains(&format!("uid: {uid}")), "provisioning/datasources/meshguard.yml lacks uid {uid}");
    }
    let providers = std::fs::read_to_string(dashboards_dir().join("provisioning/dashboards/meshguard.yml")).unwrap();
    assert!(providers.contains("type: file"), "{providers}");
}

/// A dashboard query as Prometheus takes it: Grafana's variables replaced by what Grafana would
/// send (every instance; a rate window of several 1 s scrapes; a 5 minute range).
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s").replace("$__range", "5m").replace("$instance", ".*")
}

/// A webhook receiver answering 200 to every delivery, counting them.
async fn webhook_receiver() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let count = Arc::new(AtomicUsize::new(0));
    let shared = count.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let count = shared.clone();
            async move {
                count.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
    let url = format!("http://{}/hook", listener.local_addr().expect("address"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, count, task)
}

/// Polls `check` until it returns `Some`, failing with `what` and the last state after `timeout`.
async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => panic!("timed out after {timeout:?} waiting for {what}; last: {last}"),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

async fn get_text(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if status.is_success() { Ok(body) } else { Err(format!("{status}: {body}")) }
}

/// An instant query; the result vector.
async fn query(client: &reqwest::Client, prometheus: &str, expr: &str) -> Result<Vec<Value>, String> {
    let resp = client.get(format!("{prometheus}/api/v1/query")).query(&[("query", expr)]).send().await.map_err(|e| e.to_string())?;
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(format!("query `{expr}` failed: {v}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_meshguard_run_answers_every_dashboard_query() {
    let prometheus_bin = tool(PROMETHEUS_ENV, "prometheus");
    let (prom_queries, sql_queries) = check_dashboards();
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();

    // Enforcement actions need a target and blocks: a local webhook receiver, and a block at the
    // first unauthorized attempt so the simulator's offenders are blocked within seconds.
    let (hook_url, deliveries, hook_task) = webhook_receiver().await;
    let config = dir.path().join("meshguard.toml");
    std::fs::write(
        &config,
        format!(
            "[enforcement]\nblock_at = 1\n\n[[enforcer.targets]]\ntype = \"webhook\"\nname = \"receiver\"\nurl = \"{hook_url}\"\n\
             secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
        ),
    )
    .unwrap();
    let metrics_port = free_port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let pg_port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshguard"));
    cmd.args(["run", "--quiet", "--config"])
        .arg(&config)
        .env("MESHGUARD_HTTP__LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("MESHGUARD_SQL__PG_LISTEN", format!("127.0.0.1:{pg_port}"))
        .env("MESHGUARD_SQL__PG_PASSWORD", "change-me")
        .env("MESHGUARD_PIPELINE__CHECKPOINT_INTERVAL_MS", "1000")
        .env("MESHGUARD_LOG", "warn");
    let mut meshguard = Guard::spawn("meshguard run", cmd, dir.path().join("meshguard.log"));

    // Every series the dashboards chart exists once an action has reached the receiver.
    let body = wait_for("meshguard's /metrics to show an enforcement action", Duration::from_secs(120), async || {
        meshguard.assert_running();
        let body = get_text(&client, &metrics_url).await?;
        let wanted = ["meshguard_enforcement_actions_total{", "meshguard_notifications_suppressed_total{"];
        if deliveries.load(Ordering::Relaxed) > 0 && wanted.iter().all(|w| body.contains(w)) {
            Ok(body)
        } else {
            Err(format!("{} webhook deliveries; metrics without {wanted:?}:\n{body}", deliveries.load(Ordering::Relaxed)))
        }
    })
    .await;
    let out = promtool(&["check", "metrics"], Some(body.as_bytes()));
    assert!(out.trim().is_empty(), "promtool check metrics found problems:\n{out}");

    // A real Prometheus scraping it every second, with the alert rules loaded.
    let prom_port = free_port();
    let prometheus = format!("http://127.0.0.1:{prom_port}");
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: meshguard\n    \
             static_configs:\n      - targets: [\"127.0.0.1:{metrics_port}\"]\n",
            dashboards_dir().join("alerts.yml").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(prometheus_bin);
    cmd.arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .arg("--log.level=warn");
    let mut server = Guard::spawn("prometheus", cmd, dir.path().join("prometheus.log"));
    wait_for("Prometheus to be ready", Duration::from_secs(60), async || {
        server.assert_running();
        get_text(&client, &format!("{prometheus}/-/ready")).await
    })
    .await;

    // The rules load and evaluate without error.
    wait_for("every alert rule to evaluate", Duration::from_secs(60), async || {
        let v: Value = serde_json::from_str(&get_text(&client, &format!("{prometheus}/api/v1/rules")).await?).map_err(|e| e.to_string())?;
        let rules: Vec<&Value> =
            v["data"]["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().unwrap()).collect();
        if rules.len() >= 6 && rules.iter().all(|r| r["health"] == "ok") { Ok(()) } else { Err(format!("{v}")) }
    })
    .await;

    // Every dashboard query, and the `instance` variable's, answers with data.
    let mut exprs: Vec<(String, String)> =
        prom_queries.iter().map(|q| (format!("{} / {}", q.dashboard, q.panel), substitute(&q.text))).collect();
    exprs.push(("the `instance` variable".into(), "count by (instance) (meshguard_input_records_total)".into()));
    wait_for("every dashboard query to return data", Duration::from_secs(120), async || {
        meshguard.assert_running();
        let mut empty = Vec::new();
        for (at, expr) in &exprs {
            if query(&client, &prometheus, expr).await?.is_empty() {
                empty.push(format!("{at}: {expr}"));
            }
        }
        if empty.is_empty() { Ok(()) } else { Err(format!("{} queries without data:\n{}", empty.len(), empty.join("\n"))) }
    })
    .await;

    // Every SQL panel's query, as Grafana sends it (macros expanded), through the PostgreSQL
    // endpoint with the real psql client and the provisioned credentials, returns rows.
    let now = chrono::Utc::now();
    let time_filter = format!(
        "ts BETWEEN '{}' AND '{}'",
        (now - chrono::Duration::hours(6)).format("%Y-%m-%dT%H:%M:%SZ"),
        (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ")
    );
    for q in &sql_queries {
        let text = q.text.replace("$__timeFilter(ts)", &time_filter);
        assert!(!text.contains('$'), "{} / {}: a Grafana macro the test does not expand: {text}", q.dashboard, q.panel);
        wait_for(&format!("SQL panel {} / {} to return rows through psql", q.dashboard, q.panel), Duration::from_secs(60), async || {
            meshguard.assert_running();
            let out = Command::new(std::env::var("MESHGUARD_PSQL_BIN").unwrap_or_else(|_| "psql".into()))
                .args(["-h", "127.0.0.1", "-p", &pg_port.to_string(), "-U", "meshguard", "-d", "meshguard", "-X", "-A", "-t"])
                .args(["-v", "ON_ERROR_STOP=1", "-c", &text])
                .env("PGPASSWORD", "change-me")
                .output()
                .map_err(|e| format!("psql: {e}"))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && !stdout.trim().is_empty() {
                Ok(())
            } else {
                Err(format!("{text}\nexit {}: {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr)))
            }
        })
        .await;
    }

    drop(server);
    drop(meshguard);
    hook_task.abort();
}
