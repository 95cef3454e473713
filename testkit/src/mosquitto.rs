//! A real Mosquitto 2 broker with its dynamic-security plugin, on loopback, for tests.
//!
//! This module owns the lifecycle of one `mosquitto` process per [`Mosquitto`]: its configuration,
//! its dynamic-security file (made by `mosquitto_ctrl dynsec init`, with an admin user) and its log,
//! all in a temporary directory that goes with it. It must never skip a test when Mosquitto is
//! missing (it fails with the command that installs it), never listen anywhere but `127.0.0.1`, and
//! never touch a system-wide broker or its configuration.

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

/// Environment variable naming the `mosquitto` binary.
pub const MOSQUITTO_BIN_ENV: &str = "MESHGUARD_MOSQUITTO_BIN";
/// Environment variable naming the dynamic-security plugin (`mosquitto_dynamic_security.so`).
pub const MOSQUITTO_DYNSEC_ENV: &str = "MESHGUARD_MOSQUITTO_DYNSEC";
/// Environment variable naming the `mosquitto_ctrl` binary.
pub const MOSQUITTO_CTRL_ENV: &str = "MESHGUARD_MOSQUITTO_CTRL";

/// What to run when something is missing.
const INSTALL_HINT: &str = "run `bash scripts/install-mosquitto.sh` from the repository root (it installs the Debian package \
     `mosquitto`, i.e. `sudo apt-get install mosquitto`), or set MESHGUARD_MOSQUITTO_BIN, MESHGUARD_MOSQUITTO_DYNSEC and \
     MESHGUARD_MOSQUITTO_CTRL";

/// Where Debian and other distributions put the plugin.
const PLUGIN_CANDIDATES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
];

/// How long [`Mosquitto::start`] waits for the listener.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between two readiness probes: a connect attempt to a closed port fails at once, so
/// probing without a pause would only spin.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// Free ports are found by binding and releasing them; a lost race is retried this often.
const PORT_ATTEMPTS: usize = 3;

/// Lines of the broker's log included in errors and printed when a test panics.
const LOG_TAIL_LINES: usize = 40;

/// A running Mosquitto with the dynamic-security plugin on `127.0.0.1`, with one admin user
/// ([`Mosquitto::ADMIN_USERNAME`], a random password) holding the plugin's `admin` role. Dropping
/// it kills the process and removes its directory.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    port: u16,
    admin_password: String,
    ctrl: PathBuf,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// The three installed pieces.
#[derive(Debug)]
struct Install {
    broker: PathBuf,
    plugin: PathBuf,
    ctrl: PathBuf,
}

impl Mosquitto {
    /// The admin user of the dynamic-security plugin.
    pub const ADMIN_USERNAME: &'static str = "admin";

    /// Starts a fresh broker on a free loopback port and returns once it accepts connections.
    ///
    /// Fails (never skips) when Mosquitto, its plugin or `mosquitto_ctrl` is missing (the error
    /// says how to install them), when the process exits early (with its log's tail), or when it
    /// does not listen within 10 s.
    pub fn start() -> anyhow::Result<Mosquitto> {
        let install = installation()?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            match Self::start_once(&install) {
                Ok(broker) => return Ok(broker),
                Err((true, e)) => last = Some(e),
                Err((false, e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no start attempt was made")).context("mosquitto lost the race for a free port"))
    }

    /// One attempt; the error's flag says whether it lost a port race (worth retrying).
    fn start_once(install: &Install) -> Result<Mosquitto, (bool, anyhow::Error)> {
        let fatal = |e: anyhow::Error| (false, e);
        let dir =
            tempfile::Builder::new().prefix("meshguard-mosquitto-").tempdir().context("creating a temporary directory").map_err(fatal)?;
        let admin_password = uuid::Uuid::new_v4().simple().to_string();
        let dynsec = dir.path().join("dynamic-security.json");
        let init = Command::new(&install.ctrl)
            .args(["dynsec", "init"])
            .arg(&dynsec)
            .args([Self::ADMIN_USERNAME, &admin_password])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} dynsec init", install.ctrl.display()))
            .map_err(fatal)?;
        if !init.status.success() || !dynsec.is_file() {
            return Err(fatal(anyhow::anyhow!(
                "`mosquitto_ctrl dynsec init` failed ({}): {}{}",
                init.status,
                String::from_utf8_lossy(&init.stdout),
                String::from_utf8_lossy(&init.stderr)
            )));
        }

        let port = super::free_port().map_err(fatal)?;
        let config_path = dir.path().join("mosquitto.conf");
        let config = format!(
            "# Written by meshguard-testkit for one test.\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous false\n\
             persistence false\n\
             plugin {plugin}\n\
             plugin_opt_config_file {dynsec}\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             # Keeps the current user when started as root (the default would switch to `mosquitto`,\n\
             # which cannot read this directory); no effect otherwise.\n\
             user root\n",
            plugin = install.plugin.display(),
            dynsec = dynsec.display(),
        );
        std::fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display())).map_err(fatal)?;

        let log_path = dir.path().join("mosquitto.log");
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display())).map_err(fatal)?;
        let log_err = log.try_clone().context("duplicating the log file handle").map_err(fatal)?;
        let child = Command::new(&install.broker)
            .arg("-c")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("spawning {}", install.broker.display()))
            .map_err(fatal)?;
        let mut broker = Mosquitto { child, port, admin_password, ctrl: install.ctrl.clone(), log_path, _dir: dir };
        match broker.wait_ready() {
            Ok(()) => Ok(broker),
            Err(e) => {
                let lost_race = broker.log_tail().contains("Address already in use");
                Err((lost_race, e))
            }
        }
    }

    /// Probes the listener until it accepts a TCP connection, the process exits, or the timeout.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("checking the mosquitto process")? {
                bail!("mosquitto exited before it was ready ({status}); log {}:\n{}", self.log_path.display(), self.log_tail());
            }
            // The plugin is loaded before the listeners open, so a listening broker enforces it.
            if TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, self.port).into(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("mosquitto did not listen on 127.0.0.1:{} within {READY_TIMEOUT:?}; log:\n{}", self.port, self.log_tail());
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
    }

    /// The broker's MQTT port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin user's password.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// Runs `mosquitto_ctrl ... dynsec ARGS` as the admin against this broker and returns its
    /// standard output, e.g. `ctrl(&["createClient", "dev1", "-p", "pw"])`. Fails when the tool
    /// fails or reports an error (it exits 0 on some, like `Client not found`).
    pub fn ctrl(&self, args: &[&str]) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let output = Command::new(&self.ctrl)
            .args(["-h", "127.0.0.1", "-p", &port, "-u", Self::ADMIN_USERNAME, "-P", &self.admin_password, "dynsec"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.ctrl.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        // Without TLS the tool always warns on stderr; only its `Error:` lines matter.
        let errors: Vec<&str> = std::str::from_utf8(&output.stderr)
            .unwrap_or_default()
            .lines()
            .chain(stdout.lines())
            .filter(|line| line.contains("Error"))
            .collect();
        ensure!(
            output.status.success() && errors.is_empty(),
            "mosquitto_ctrl dynsec {}: {} {}",
            args.join(" "),
            output.status,
            errors.join("; ")
        );
        Ok(stdout)
    }

    /// The last 40 lines of the broker's log.
    pub fn log_tail(&self) -> String {
        match std::fs::read(&self.log_path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log_path.display()),
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- mosquitto log tail (127.0.0.1:{}) ---\n{}\n---", self.port, self.log_tail());
        }
        if let Err(error) = self.child.kill() {
            tracing::warn!(message = "Failed to kill mosquitto.", %error, pid = self.child.id());
        }
        if let Err(error) = self.child.wait() {
            tracing::warn!(message = "Failed to reap mosquitto.", %error, pid = self.child.id());
        }
    }
}

/// Finds the broker, the plugin and `mosquitto_ctrl`, or says how to install them.
fn installation() -> anyhow::Result<Install> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let path = var("PATH");
    let broker = locate(var(MOSQUITTO_BIN_ENV), "mosquitto", path.as_ref(), &["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]);
    let ctrl = locate(var(MOSQUITTO_CTRL_ENV), "mosquitto_ctrl", path.as_ref(), &["/usr/bin/mosquitto_ctrl"]);
    let plugin = var(MOSQUITTO_DYNSEC_ENV).map(PathBuf::from).or_else(|| PLUGIN_CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()));
    match (broker, plugin, ctrl) {
        (Some(broker), Some(plugin), Some(ctrl)) if broker.is_file() && plugin.is_file() && ctrl.is_file() => {
            Ok(Install { broker, plugin, ctrl })
        }
        (broker, plugin, ctrl) => bail!(
            "Mosquitto 2 with its dynamic-security plugin is not installed (found: mosquitto {}, plugin {}, mosquitto_ctrl {}); {INSTALL_HINT}",
            shown(broker.as_deref()),
            shown(plugin.as_deref()),
            shown(ctrl.as_deref())
        ),
    }
}

/// `explicit` if set, else `name` on `PATH`, else the first existing fallback.
fn locate(explicit: Option<OsString>, name: &str, path: Option<&OsString>, fallbacks: &[&str]) -> Option<PathBuf> {
    if let Some(explicit) = explicit {
        return Some(PathBuf::from(explicit));
    }
    path.into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|candidate| candidate.is_file())
}

fn shown(path: Option<&Path>) -> String {
    match path {
        Some(path) if path.is_file() => path.display().to_string(),
        Some(path) => format!("{} (no such file)", path.display()),
        None => String::from("missing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_paths_win_and_missing_ones_are_named() {
        let explicit = Some(OsString::from("/opt/mosquitto"));
        assert_eq!(locate(explicit, "mosquitto", None, &[]), Some(PathBuf::from("/opt/mosquitto")));
        assert_eq!(locate(None, "no-such-binary-here", Some(&OsString::from("/nonexistent")), &["/nonexistent/x"]), None);
        assert_eq!(shown(None), "missing");
        assert!(shown(Some(Path::new("/nonexistent/x"))).contains("no such file"));
    }
}
