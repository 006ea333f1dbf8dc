//! The two systems under test, each started on the gateway side of a link lab with
//! its central-side companion: (a) a Mosquitto bridge, (b) edgerelay + `unpack`.
//!
//! Why these settings: the bridge is configured as a careful user would (see
//! [`BRIDGE_CONF`]); edgerelay runs its defaults (batch mode, trained dictionary,
//! link-adaptive rate) with the same reconnect cap as the bridge, so neither wins by
//! retrying sooner after the outage.
//!
//! Invariants: both listen on 127.0.0.1:[`EDGE_PORT`] inside the gateway namespace and
//! deliver to the central broker under [`System::delivery_filter`]; the edge process
//! is exec'd by nsenter (no fork), so the pid we read CPU and memory from is the
//! broker's or the agent's own.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use edgerelay_tests::{LabCentral, Unpack};
use linklab::{Lab, Side};

/// Keys laid over edgerelay's config (`--relay-toml`, for what-if runs; empty in the
/// recorded figures).
static RELAY_EXTRA: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();

/// Sets the what-if keys: any section, including ones the base config already has.
pub fn set_relay_extra(extra: &str) -> Result<(), toml::de::Error> {
    let table: toml::Table = extra.parse()?;
    let _ = RELAY_EXTRA.set(table);
    Ok(())
}

/// `extra`'s keys over `base`'s, table by table.
fn overlay(base: &mut toml::Table, extra: &toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => overlay(b, e),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The edge's local MQTT port, inside the gateway namespace.
pub const EDGE_PORT: u16 = 1883;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Bridge,
    Relay,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Bridge => "mosquitto bridge",
            System::Relay => "edgerelay",
        }
    }

    /// Where delivered messages appear on the central broker.
    pub fn delivery_filter(self) -> &'static str {
        match self {
            System::Bridge => "gw-1/#",
            System::Relay => "out/#",
        }
    }
}

/// The edge mosquitto: persistence on and saved every 5 s (the default is every 30
/// minutes, which a user who cares about a crash would not keep), an unbounded queue
/// (the default 1,000 messages would drop most of a 60-s outage), QoS 1 both ways,
/// `cleansession false` so the central broker keeps the session across reconnects, and
/// a reconnect back-off capped at 10 s. Everything else is mosquitto 2.0's default,
/// including 20 QoS 1 messages in flight on the bridge and Nagle's algorithm on.
const BRIDGE_CONF: &str = "\
per_listener_settings false
listener 1883 127.0.0.1
allow_anonymous true
persistence true
persistence_location {DIR}/
autosave_interval 5
max_queued_messages 0
max_queued_bytes 0
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information

connection central
address {CENTRAL}:1883
clientid gw-1
cleansession false
bridge_protocol_version mqttv311
try_private true
notifications false
keepalive_interval 30
restart_timeout 1 10
topic sensors/# out 1 \"\" gw-1/
topic logs/# out 1 \"\" gw-1/
";

/// Lines a child process wrote to stderr.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// The edge process, restartable.
#[allow(missing_debug_implementations)]
pub struct Edge {
    pub system: System,
    netns: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    log: Arc<Lines>,
    /// Central side of the relay: unpack republishing under `out/`.
    unpack: Option<Unpack>,
    /// CPU ticks of processes that were killed (restarts keep the total).
    ticks_before: u64,
    hwm_before: u64,
}

impl Edge {
    /// Start `system` on `lab`'s gateway side, its central companion beside `central`,
    /// and wait until it accepts devices.
    pub fn start(system: System, lab: &Lab, central: &LabCentral) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // mosquitto started as root drops to its own user: it must write here.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
        }
        let central_addr = lab.addr(Side::Central).to_string();
        let unpack = match system {
            System::Bridge => {
                let conf = BRIDGE_CONF
                    .replace("{DIR}", &dir.path().display().to_string())
                    .replace("{CENTRAL}", &central_addr);
                std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write conf");
                None
            }
            System::Relay => {
                let conf = relay_config(&dir.path().join("data"), &central.url);
                std::fs::write(dir.path().join("edgerelay.toml"), conf).expect("write config");
                Some(Unpack::start_in_netns_with(
                    lab.namespace(Side::Central),
                    &central.url,
                    "gw-1",
                    &dir.path().join("unpack-state.redb"),
                    &["--republish-prefix", "out/"],
                ))
            }
        };
        let mut e = Self {
            system,
            netns: lab.namespace(Side::Gateway).to_owned(),
            dir,
            child: None,
            log: Arc::default(),
            unpack,
            ticks_before: 0,
            hwm_before: 0,
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns));
        match self.system {
            System::Bridge => {
                cmd.arg(edgerelay_tests::require_binary("mosquitto", "mosquitto"))
                    .arg("-c")
                    .arg(self.dir.path().join("mosquitto.conf"));
            }
            System::Relay => {
                cmd.arg(edgerelay_tests::agent_bin())
                    .args(["run", "--config"])
                    .arg(self.dir.path().join("edgerelay.toml"))
                    .env("EDGERELAY_LOG", "info");
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the edge");
        let stderr = child.stderr.take().expect("stderr");
        let sink = self.log.clone();
        let start = sink.lines.lock().expect("log lock").len();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lines.lock().expect("log lock").push(line);
                sink.changed.notify_all();
            }
        });
        self.child = Some(child);
        let ready = match self.system {
            System::Bridge => " running",
            System::Relay => "edgerelay ready",
        };
        self.wait_for_log(ready, start, Duration::from_secs(60));
    }

    fn wait_for_log(&self, needle: &str, from: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().expect("log lock");
        while !lines[from.min(lines.len())..]
            .iter()
            .any(|l| l.contains(needle))
        {
            let now = Instant::now();
            assert!(
                now < deadline,
                "{} did not log {needle:?} within {timeout:?}:\n{}",
                self.system.name(),
                lines.join("\n")
            );
            lines = self
                .log
                .changed
                .wait_timeout(lines, deadline - now)
                .expect("log lock")
                .0;
        }
    }

    /// The edge's log and, for edgerelay, unpack's: what to read when a figure is off.
    pub fn diagnostics(&self) -> String {
        let edge = self.log.lines.lock().expect("log lock").join("\n");
        let unpack = self.unpack.as_ref().map(Unpack::logs).unwrap_or_default();
        format!(
            "--- {} log:\n{edge}\n--- unpack log:\n{unpack}",
            self.system.name()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// CPU seconds (user + system) used by the edge so far, across restarts.
    pub fn cpu_seconds(&self) -> f64 {
        (self.ticks_before + ticks(self.pid())) as f64 / clock_ticks()
    }

    /// Peak resident memory, KiB, the largest of every run of the process.
    pub fn peak_rss_kib(&self) -> u64 {
        self.hwm_before.max(hwm_kib(self.pid()))
    }

    /// SIGKILL, then start again (as systemd's Restart=always would).
    pub fn kill9_and_restart(&mut self) {
        self.ticks_before += ticks(self.pid());
        self.hwm_before = self.peak_rss_kib();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// edgerelay's config: its defaults, as the local MQTT broker of the devices.
fn relay_config(data_dir: &Path, central_url: &str) -> String {
    let base = format!(
        r##"[agent]
gateway_id = "gw-1"
data_dir = "{}"

[upstream]
url = "{central_url}"
topic_prefix = "gw-1"
mode = "batch"
reconnect_max = "10s"

[local_mqtt]
listen = "127.0.0.1:{EDGE_PORT}"
topics = ["#"]
"##,
        data_dir.display(),
    );
    let Some(extra) = RELAY_EXTRA.get() else {
        return base;
    };
    match base.parse::<toml::Table>() {
        Ok(mut table) => {
            overlay(&mut table, extra);
            table.to_string()
        }
        // The base is ours and always parses; were it not to, run it as it is.
        Err(_) => base,
    }
}

/// utime + stime of `pid`, in clock ticks (0 once it is gone).
fn ticks(pid: u32) -> u64 {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// CPU seconds used so far by this process's threads named `name` (the load
/// generator's runtime), to show it is not the bottleneck.
pub fn own_threads_cpu_seconds(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ticks: u64 = tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .map(|t| stat_ticks(&t.path().join("stat").display().to_string()))
        .sum();
    ticks as f64 / clock_ticks()
}

/// utime + stime in a /proc/…/stat file.
fn stat_ticks(path: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    // Fields after the command name, which may hold spaces: state is field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Clock ticks per second (USER_HZ), asked once.
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}
