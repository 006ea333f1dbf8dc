//! Test harness for edgerelay's integration tests: a real `mosquitto` process as the
//! central broker, the real `edgerelay` binary, and a real MQTT subscriber (rumqttc).
//!
//! Invariants: every process started here is killed on drop (a failing test leaves
//! nothing running); readiness is waited on (a port accepting, a log line), never slept
//! for; a missing system package fails the test with a message saying how to install it.

pub mod fleet;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Generous deadline for anything that should happen "soon" on a loaded CI machine.
pub const SOON: Duration = Duration::from_secs(30);

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Same for UDP.
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    s.local_addr().expect("local addr").port()
}

/// Poll `f` until it returns Some, or panic with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    wait_until(&format!("{addr} to accept connections"), timeout, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .ok()
            .map(|_| ())
    });
}

pub fn require_binary(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("`{name}` is not installed: these tests need the Debian package `{package}` (the README's test command, scripts/test.sh, installs it)");
}

/// A real mosquitto broker on a loopback port, with persistence in its own temp dir so
/// that a restart keeps the test subscriber's session and queued messages.
#[allow(missing_debug_implementations)]
pub struct Mosquitto {
    pub port: u16,
    host: std::net::Ipv4Addr,
    /// Network namespace it runs in (a link lab's central side), if not the test's own.
    netns: Option<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Start with extra mosquitto.conf lines.
    pub fn start_with(extra: &str) -> Self {
        Self::launch(None, std::net::Ipv4Addr::LOCALHOST, free_port(), extra)
    }

    /// Start inside network namespace `netns` (e.g. a link lab's central side),
    /// listening on `host`:1883.
    pub fn start_in(netns: &str, host: std::net::Ipv4Addr) -> Self {
        Self::launch(Some(netns.to_owned()), host, 1883, "")
    }

    fn launch(netns: Option<String>, host: std::net::Ipv4Addr, port: u16, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Started as root, mosquitto drops to the `mosquitto` user: it must be able to
        // write its persistence file here.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod broker dir");
        }
        let conf = format!(
            "listener {port} {host}\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 0\nlog_dest stderr\n{extra}\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut m = Self {
            port,
            host,
            netns,
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let bin = require_binary("mosquitto", "mosquitto");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .expect("mosquitto log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        if self.netns.is_none() {
            wait_for_port(self.addr(), SOON);
        } else {
            // Not reachable from the test's namespace: its log says when it listens.
            let started = self.log().matches(" running").count();
            wait_until("mosquitto in the lab to listen", SOON, || {
                (self.log().matches(" running").count() > started).then_some(())
            });
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.host, self.port))
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.port)
    }

    /// Stop the broker (SIGTERM, so it saves its persistence file) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
            let _ = c.wait();
        }
    }

    /// Start it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

/// Benchmarks: run the release agent with `config` written to `dir/edgerelay.toml`,
/// logging at info; its stderr lines arrive on the returned channel.
pub fn spawn_release_agent(dir: &Path, config: &str) -> (Child, mpsc::Receiver<String>) {
    let path = dir.join("edgerelay.toml");
    std::fs::write(&path, config).expect("write config");
    let mut agent = Command::new(build_agent(&[]))
        .args(["run", "--config"])
        .arg(&path)
        .env("EDGERELAY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the release agent");
    let (tx, rx) = mpsc::channel();
    let stderr = agent.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (agent, rx)
}

/// The `edgerelay` binary, built once per test process with the same profile as the
/// tests, so a test never runs a stale binary.
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_agent(&["test-hooks"])).clone()
}

/// Build the agent binary with `features`, in the profile of the running executable
/// (target/<profile>/deps/<test> or target/<profile>/<bin>), and return its path.
/// EDGERELAY_BIN overrides (e.g. a cross-built binary).
pub fn build_agent(features: &[&str]) -> PathBuf {
    if let Ok(p) = std::env::var("EDGERELAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .ancestors()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n == "debug" || n == "release")
        })
        .expect("running from target/<profile>")
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `cargo test` gives its test processes the package's CARGO_PKG_*, CARGO_MANIFEST_*
    // and the like, which ring's build script tracks: passed on, they would make this
    // build differ from the one run from a shell (scripts/test.sh) and rebuild ring,
    // rustls and the agent every time the two alternate.
    const SET_FOR_TESTS: [&str; 6] = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
    ];
    for (key, _) in std::env::vars_os() {
        if SET_FOR_TESTS
            .iter()
            .any(|p| key.to_string_lossy().starts_with(p))
        {
            cmd.env_remove(key);
        }
    }
    cmd.args(["build", "--quiet", "-p", "edgerelay", "--bin", "edgerelay"]);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .expect("run cargo build for the edgerelay binary");
    assert!(status.success(), "building the edgerelay binary failed");
    let bin = profile_dir.join("edgerelay");
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

/// Output lines of a child process, shared with the thread that reads them.
#[derive(Default)]
struct LogBuf {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl LogBuf {
    /// Block until `pred` holds over the lines so far, or panic naming `what`.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().expect("log lock");
        loop {
            if pred(&lines) {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {what}; output so far:\n{}",
                lines.join("\n")
            );
            lines = self
                .changed
                .wait_timeout(lines, deadline - now)
                .expect("log lock")
                .0;
        }
    }
}

/// A running `edgerelay run` process.
#[allow(missing_debug_implementations)]
pub struct Agent {
    child: Option<Child>,
    log: Arc<LogBuf>,
    pub config_path: PathBuf,
}

impl Agent {
    /// Write `config` into `dir/edgerelay.toml`, start the agent and wait for its ready line.
    pub fn start(dir: &Path, config: &str) -> Self {
        let a = Self::spawn(dir, config);
        a.wait_for_log("edgerelay ready", SOON);
        a
    }

    /// Start without waiting for readiness (for tests that expect start-up to fail).
    pub fn spawn(dir: &Path, config: &str) -> Self {
        Self::spawn_with_env(dir, config, &[])
    }

    /// Start with extra environment variables and wait for readiness.
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        let a = Self::spawn_with_env(dir, config, env);
        a.wait_for_log("edgerelay ready", SOON);
        a
    }

    pub fn spawn_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_cmd(Command::new(agent_bin()), dir, config, env)
    }

    /// Start inside network namespace `netns` (a link lab's gateway side) and wait for
    /// readiness. Only the network namespace changes (nsenter, not `ip netns exec`,
    /// which remounts /sys and so hides the cgroup2 mount the eBPF probe attaches to).
    pub fn start_in_netns(netns: &str, dir: &Path, config: &str) -> Self {
        Self::start_wrapped(
            &["nsenter", &format!("--net=/run/netns/{netns}")],
            dir,
            config,
        )
    }

    /// Start through a wrapper command (e.g. `setpriv …` to drop capabilities) and
    /// wait for readiness.
    pub fn start_wrapped(wrapper: &[&str], dir: &Path, config: &str) -> Self {
        let (program, args) = wrapper.split_first().expect("a wrapper command");
        let mut cmd = Command::new(program);
        cmd.args(args).arg(agent_bin());
        let a = Self::spawn_cmd(cmd, dir, config, &[]);
        a.wait_for_log("edgerelay ready", SOON);
        a
    }

    fn spawn_cmd(cmd: Command, dir: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_full(cmd, dir, config, env, &[])
    }

    /// Start `run --config … ARGS` (e.g. `--repair`) without waiting for readiness.
    pub fn spawn_args(dir: &Path, config: &str, args: &[&str]) -> Self {
        Self::spawn_full(Command::new(agent_bin()), dir, config, &[], args)
    }

    fn spawn_full(
        mut cmd: Command,
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        let config_path = dir.join("edgerelay.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut child = cmd
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env(
                "EDGERELAY_LOG",
                std::env::var("EDGERELAY_TEST_LOG")
                    .unwrap_or_else(|_| "info,edgerelay=debug".into()),
            )
            // After the default, so a test may set EDGERELAY_LOG itself.
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edgerelay");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(LogBuf::default());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("EDGERELAY_TEST_ECHO").is_some() {
                    eprintln!("agent: {line}");
                }
                sink.lines.lock().expect("log lock").push(line);
                sink.changed.notify_all();
            }
        });
        Self {
            child: Some(child),
            log,
            config_path,
        }
    }

    pub fn logs(&self) -> String {
        self.log.lines.lock().expect("log lock").join("\n")
    }

    /// The log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines.lock().expect("log lock").clone()
    }

    /// Block until `pred` holds over the log lines.
    pub fn wait_for_logs(&self, what: &str, timeout: Duration, pred: impl Fn(&[String]) -> bool) {
        self.log.wait_for(what, timeout, pred);
    }

    /// Block until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.log
            .wait_for(&format!("agent log line {needle:?}"), timeout, |lines| {
                lines.iter().any(|l| l.contains(needle))
            });
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("agent running")
    }

    /// The address its metrics/health/status endpoint listens on (from its log).
    pub fn endpoint(&self) -> SocketAddr {
        self.wait_for_log("status endpoint listening", SOON);
        self.log_lines()
            .iter()
            .find(|l| l.contains("status endpoint listening"))
            .and_then(|l| l.split("listen=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("the endpoint's address in the log")
    }

    /// Send `signal` (e.g. libc::SIGHUP) to the agent.
    pub fn signal(&self, signal: i32) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit, at most `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("agent running");
        terminate(&mut c);
        self.wait_child(c, timeout)
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let c = self.child.take().expect("agent running");
        self.wait_child(c, timeout)
    }

    fn wait_child(&mut self, mut c: Child, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().expect("wait agent") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "agent did not exit within {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A message as received by the subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    /// When it arrived, milliseconds since the Unix epoch (for latencies measured
    /// against a timestamp the publisher put in the payload).
    pub at_ms: u64,
}

/// A real MQTT subscriber (rumqttc) on the central broker, with a persistent session so
/// it keeps receiving across broker restarts. Collects everything it receives.
#[allow(missing_debug_implementations)]
pub struct Subscriber {
    rx: mpsc::Receiver<Received>,
    pub received: Vec<Received>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Subscriber {
    /// Connect and subscribe to `filter` at QoS 1; returns once the SUBACK arrived.
    pub fn start(broker_port: u16, filter: &str) -> Self {
        Self::start_at("127.0.0.1", broker_port, filter)
    }

    /// Subscribe on the broker at `host`:`port` (e.g. from inside a link lab's central
    /// namespace: the subscriber's thread stays in the namespace it was started in).
    pub fn start_at(host: &str, broker_port: u16, filter: &str) -> Self {
        let id = format!("test-sub-{}", rand::random::<u32>());
        let mut opts = rumqttc::MqttOptions::new(id, host, broker_port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut conn) = rumqttc::Client::new(opts, 64);
        client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .expect("subscribe request");
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            let _client = client;
            for ev in conn.iter() {
                if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let msg = Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            at_ms: unix_ms(),
                        };
                        if tx.send(msg).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    // The broker is down (an outage test): retry, rumqttc resumes the session.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx.recv_timeout(SOON).expect("SUBACK from the broker");
        Self {
            rx,
            received: Vec::new(),
            stop,
        }
    }

    /// Take what has arrived so far.
    pub fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.received.push(m);
        }
    }

    /// Wait until `pred` holds over everything received, or fail with `what`.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[Received]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if pred(&self.received) {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out after {timeout:?} waiting for {what}; received {} messages",
                self.received.len()
            );
            if let Ok(m) = self
                .rx
                .recv_timeout((deadline - now).min(Duration::from_millis(200)))
            {
                self.received.push(m);
            }
        }
    }

    /// Payload → number of times received.
    pub fn counts(&self) -> HashMap<Vec<u8>, usize> {
        let mut m = HashMap::new();
        for r in &self.received {
            *m.entry(r.payload.clone()).or_insert(0) += 1;
        }
        m
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A minimal agent config around `upstream_url`, with `extra` TOML appended.
pub fn agent_config(data_dir: &Path, upstream_url: &str, extra: &str) -> String {
    // Tests run agents side by side: their endpoints take an ephemeral port each
    // (`Agent::endpoint` reads it from the log) unless the test names one.
    let metrics = if extra.contains("[metrics]") {
        ""
    } else {
        "[metrics]\nlisten = \"127.0.0.1:0\"\n"
    };
    format!(
        r#"[agent]
gateway_id = "gw-test"
data_dir = "{}"

[upstream]
url = "{upstream_url}"
topic_prefix = "up"
mode = "passthrough"
reconnect_min = "50ms"
reconnect_max = "500ms"
keep_alive = "5s"

{metrics}
{extra}
"#,
        data_dir.display()
    )
}

/// Write one length-prefixed frame.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// `mosquitto_pub`/`mosquitto_sub` and friends from the mosquitto-clients package.
pub fn mosquitto_client(name: &str) -> Command {
    Command::new(require_binary(name, "mosquitto-clients"))
}

/// Debian's python3 with the python3-paho-mqtt package (not a pyenv interpreter that
/// may lack it).
pub fn python_with_paho() -> Command {
    let py = require_binary("python3", "python3");
    let ok = Command::new(&py)
        .args(["-c", "import paho.mqtt.client"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "python3 cannot import paho.mqtt: install the Debian package `python3-paho-mqtt` (scripts/test.sh does)");
    Command::new(py)
}

/// A running `mosquitto_sub` whose output lines are collected; `start` returns once it
/// has its SUBACK (it runs with -d, whose debug line says so).
#[allow(missing_debug_implementations)]
pub struct MosquittoSub {
    child: Child,
    lines: Arc<LogBuf>,
}

impl MosquittoSub {
    pub fn start(args: &[&str]) -> Self {
        // Line-buffered stdout (stdbuf), or the SUBACK line sits in a pipe buffer.
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg(require_binary("mosquitto_sub", "mosquitto-clients"))
            .arg("-d")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(LogBuf::default());
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lines.lock().expect("lock").push(line);
                sink.changed.notify_all();
            }
        });
        let s = Self { child, lines };
        s.wait_for(
            "SUBACK",
            |l| {
                l.iter()
                    .any(|x| x.to_lowercase().contains("received suback"))
            },
            SOON,
        );
        s
    }

    /// Output lines that are messages (not -d debug lines).
    pub fn messages(&self) -> Vec<String> {
        self.lines
            .lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed"))
            .cloned()
            .collect()
    }

    pub fn wait_for(&self, what: &str, pred: impl Fn(&[String]) -> bool, timeout: Duration) {
        self.lines
            .wait_for(&format!("mosquitto_sub: {what}"), timeout, pred);
    }
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Config with the local MQTT endpoint on `port`, relaying `topics`.
pub fn local_mqtt_section(port: u16, topics: &str, extra: &str) -> String {
    format!("[local_mqtt]\nlisten = \"127.0.0.1:{port}\"\ntopics = {topics}\n{extra}\n")
}

/// A running `edgerelay unpack --jsonl`: its JSON lines (stdout) and log (stderr).
#[allow(missing_debug_implementations)]
pub struct Unpack {
    child: Option<Child>,
    out: Arc<LogBuf>,
    log: Arc<LogBuf>,
}

impl Unpack {
    /// Start and wait until it is subscribed.
    pub fn start(broker_url: &str, prefix: &str, state: &Path) -> Self {
        Self::start_with(broker_url, prefix, state, &["--jsonl"])
    }

    /// Start with extra arguments (e.g. `--republish-prefix P`).
    pub fn start_with(broker_url: &str, prefix: &str, state: &Path, args: &[&str]) -> Self {
        Self::start_cmd(Command::new(agent_bin()), broker_url, prefix, state, args)
    }

    /// Start inside network namespace `netns` (a link lab's central side), `--jsonl`.
    pub fn start_in_netns(netns: &str, broker_url: &str, prefix: &str, state: &Path) -> Self {
        Self::start_in_netns_with(netns, broker_url, prefix, state, &["--jsonl"])
    }

    /// Start inside network namespace `netns` with `args` (e.g. `--republish-prefix P`).
    pub fn start_in_netns_with(
        netns: &str,
        broker_url: &str,
        prefix: &str,
        state: &Path,
        args: &[&str],
    ) -> Self {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg(agent_bin());
        Self::start_cmd(cmd, broker_url, prefix, state, args)
    }

    fn start_cmd(
        mut cmd: Command,
        broker_url: &str,
        prefix: &str,
        state: &Path,
        args: &[&str],
    ) -> Self {
        let mut child = cmd
            .args([
                "unpack",
                "--broker",
                broker_url,
                "--prefix",
                prefix,
                "--client-id",
                "test-unpack",
                "--state",
            ])
            .arg(state)
            .args(args)
            .env("EDGERELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn unpack");
        let out = Arc::new(LogBuf::default());
        let log = Arc::new(LogBuf::default());
        for (pipe, sink) in [
            (
                Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
                out.clone(),
            ),
            (
                Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
                log.clone(),
            ),
        ] {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lines.lock().expect("lock").push(line);
                    sink.changed.notify_all();
                }
            });
        }
        let u = Self {
            child: Some(child),
            out,
            log,
        };
        u.log.wait_for("unpack to subscribe", SOON, |l| {
            l.iter().any(|x| x.contains("unpack subscribed"))
        });
        u
    }

    /// JSON lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.lines.lock().expect("lock").clone()
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[String]) -> bool) {
        self.out.wait_for(what, timeout, pred);
    }

    pub fn logs(&self) -> String {
        self.log.lines.lock().expect("lock").join("\n")
    }

    /// Log lines so far (gap notices are logged: "gateway reports records dropped").
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines.lock().expect("lock").clone()
    }

    /// SIGTERM and wait (its output threads then see EOF).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
            let _ = c.wait();
        }
    }
}

impl Drop for Unpack {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The central side of a link lab: a real mosquitto in its namespace, and the URL the
/// gateway side reaches it at.
#[allow(missing_debug_implementations)]
pub struct LabCentral {
    pub broker: Mosquitto,
    pub url: String,
    host: String,
    netns: String,
}

impl LabCentral {
    pub fn start(lab: &linklab::Lab) -> Self {
        let side = linklab::Side::Central;
        let broker = Mosquitto::start_in(lab.namespace(side), lab.addr(side));
        Self {
            broker,
            url: format!("mqtt://{}:1883", lab.addr(side)),
            host: lab.addr(side).to_string(),
            netns: lab.namespace(side).to_owned(),
        }
    }

    /// A subscriber on the broker, from inside the central namespace.
    pub fn subscriber(&self, lab: &linklab::Lab, filter: &str) -> Subscriber {
        let (host, filter) = (self.host.clone(), filter.to_owned());
        lab.run_in(linklab::Side::Central, move || {
            Subscriber::start_at(&host, 1883, &filter)
        })
        .expect("in the lab")
    }

    /// `edgerelay unpack --jsonl` beside the broker (prefix "up").
    pub fn unpack(&self, state: &Path) -> Unpack {
        Unpack::start_in_netns(&self.netns, &self.url, "up", state)
    }

    /// An agent config uploading batches to the broker, with `extra` appended.
    pub fn batch_config(&self, data_dir: &Path, extra: &str) -> String {
        agent_config(data_dir, &self.url, extra)
            .replace("mode = \"passthrough\"\n", "mode = \"batch\"\n")
    }
}

/// Print the agent's last `last` rate-controller lines ("uplink plan", "link quality"):
/// the trace to read when a link-lab figure is off.
pub fn print_control_trace(agent: &Agent, last: usize) {
    let lines: Vec<String> = agent
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("uplink plan") || l.contains("link quality"))
        .collect();
    for l in &lines[lines.len().saturating_sub(last)..] {
        eprintln!("{l}");
    }
}

/// With `EDGERELAY_TEST_TRACE` set: a thread that prints, once a second, what the lab's
/// bottleneck (`dir`) did in each tenth of it — how busy it was (% of `bits_per_s`),
/// and the tail drops — next to the wall clock the agent's log uses, so a goodput dip
/// can be matched to the controller's plan. Stops when `stop` is set.
pub fn trace_bottleneck(
    lab: &linklab::Lab,
    dir: linklab::Dir,
    bits_per_s: f64,
    stop: &std::sync::atomic::AtomicBool,
) {
    if std::env::var_os("EDGERELAY_TEST_TRACE").is_none() {
        return;
    }
    let tenth = Duration::from_millis(100);
    let mut prev = lab.stats(dir);
    let mut next = Instant::now() + tenth;
    let mut busy = Vec::new();
    let mut drops = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += tenth;
        let s = lab.stats(dir);
        let bytes = s.bytes_out - prev.bytes_out;
        busy.push((bytes as f64 * 8.0 / (bits_per_s * 0.1) * 100.0).round() as u32);
        drops += s.queue_dropped - prev.queue_dropped;
        prev = s;
        if busy.len() == 10 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let secs = now.as_secs() % 86_400;
            eprintln!(
                "bottleneck {:02}:{:02}:{:02} busy% {:?} mean {} tail-drops {drops}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60,
                busy,
                busy.iter().sum::<u32>() / 10
            );
            busy.clear();
            drops = 0;
        }
    }
}

/// A plain HTTP/1.0 request to `addr` (the agent's endpoint): status code and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out:?}"));
    (code, body.to_owned())
}

/// Samples of a Prometheus text exposition: (name with labels, value). Panics on a
/// line that is neither a comment nor `name[{labels}] value`.
pub fn prometheus_samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {l:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("not a value: {l:?}")),
            };
            (name.to_owned(), value)
        })
        .collect()
}

/// A bare MQTT 3.1.1 client on rumqttc's packet codec, one QoS 1 publish at a time and
/// no retransmission of its own: what the torture and hostile-client drills need to know
/// exactly which publish got its PUBACK (and when).
#[derive(Debug)]
pub struct MiniMqtt {
    conn: std::net::TcpStream,
    buf: bytes::BytesMut,
    next_pkid: u16,
}

impl MiniMqtt {
    /// TCP connect, CONNECT as `client_id`, wait for a successful CONNACK.
    pub fn connect(port: u16, client_id: &str) -> Option<Self> {
        use rumqttc::mqttbytes::v4;
        use std::io::Write;
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        conn.set_nodelay(true).ok()?;
        let mut out = bytes::BytesMut::new();
        let mut connect = v4::Connect::new(client_id);
        connect.keep_alive = 30;
        v4::Packet::Connect(connect).write(&mut out, 1 << 20).ok()?;
        conn.write_all(&out).ok()?;
        let mut c = Self {
            conn,
            buf: bytes::BytesMut::new(),
            next_pkid: 0,
        };
        match c.read_packet()? {
            v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success => Some(c),
            _ => None,
        }
    }

    /// Publish at QoS 1 and wait for its PUBACK; false if the connection failed first.
    pub fn publish(&mut self, topic: &str, payload: &[u8]) -> bool {
        use rumqttc::mqttbytes::v4;
        use std::io::Write;
        self.next_pkid = self.next_pkid % 65_000 + 1;
        let pkid = self.next_pkid;
        let mut p = v4::Publish::new(
            topic,
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            payload.to_vec(),
        );
        p.pkid = pkid;
        let mut out = bytes::BytesMut::new();
        if v4::Packet::Publish(p).write(&mut out, 1 << 20).is_err()
            || self.conn.write_all(&out).is_err()
        {
            return false;
        }
        loop {
            match self.read_packet() {
                Some(v4::Packet::PubAck(a)) if a.pkid == pkid => return true,
                Some(v4::Packet::PubAck(_)) | Some(v4::Packet::PingResp) => {}
                _ => return false,
            }
        }
    }

    /// Subscribe to `filter` at QoS 1 and wait for the SUBACK.
    pub fn subscribe(&mut self, filter: &str) -> bool {
        use rumqttc::mqttbytes::v4;
        use std::io::Write;
        let sub = v4::Subscribe::new(filter, rumqttc::mqttbytes::QoS::AtLeastOnce);
        let mut out = bytes::BytesMut::new();
        if v4::Packet::Subscribe(sub).write(&mut out, 1 << 20).is_err()
            || self.conn.write_all(&out).is_err()
        {
            return false;
        }
        matches!(self.read_packet(), Some(v4::Packet::SubAck(_)))
    }

    fn read_packet(&mut self) -> Option<rumqttc::mqttbytes::v4::Packet> {
        use std::io::Read;
        loop {
            match rumqttc::mqttbytes::v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(_) => return None,
            }
            let mut chunk = [0u8; 4096];
            match self.conn.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
    }
}

/// Resident memory of process `pid` in KiB (VmRSS), if it is still running.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
