//! Corrupt and wrong files (issue 10): a truncated buffer file stops the real binary
//! with an error that names the file and `--repair`; `run --repair` moves it aside,
//! starts empty and reports the loss upstream (a `buffer_lost` gap notice at the
//! central broker). An unreadable config, a data_dir the agent may not write (the agent
//! run as `nobody`), and the data_dir's own permissions.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use edgerelay_tests::*;

const SOON: Duration = Duration::from_secs(20);

/// Run `edgerelay ARGS` as user nobody (setpriv, util-linux) and wait for it to exit.
fn as_nobody(args: &[&str]) -> Output {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0")),
        "this test drops to user nobody with setpriv: run it as root (scripts/test.sh is run with sudo)"
    );
    let mut child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(agent_bin())
        .args(args)
        .env("EDGERELAY_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    let deadline = Instant::now() + SOON;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("edgerelay {args:?} as nobody did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn a_truncated_buffer_file_stops_the_agent_and_repair_reports_the_loss_upstream() {
    let broker = Mosquitto::start();
    let mut central = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_port();
    let config = agent_config(
        &data,
        &broker.url(),
        &local_mqtt_section(port, r#"["sensors/#"]"#, ""),
    );
    // A real buffer with unsent records (the upstream is down), then cut short.
    let mut dead_upstream = config.replace(&broker.url(), "mqtt://127.0.0.1:1");
    dead_upstream.push('\n');
    let mut agent = Agent::start(dir.path(), &dead_upstream);
    for i in 0..50 {
        let st = mosquitto_client("mosquitto_pub")
            .args(["-p", &port.to_string(), "-q", "1", "-t", "sensors/a"])
            .args(["-m", &format!("before-{i}")])
            .status()
            .expect("mosquitto_pub");
        assert!(st.success());
    }
    agent.kill9();
    let file = data.join("buffer.redb");
    let len = std::fs::metadata(&file).expect("buffer file").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");

    let mut agent = Agent::spawn(dir.path(), &config);
    let status = agent.wait_exit(SOON);
    assert_eq!(status.code(), Some(1), "{}", agent.logs());
    let log = agent.logs();
    assert!(
        log.contains("buffer.redb") && log.contains("corrupt") && log.contains("--repair"),
        "the error does not name the file and the way out:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    let agent = Agent::spawn_args(dir.path(), &config, &["--repair"]);
    agent.wait_for_log("edgerelay ready", SOON);
    assert!(agent.logs().contains("moved aside"), "{}", agent.logs());
    let aside: Vec<_> = std::fs::read_dir(&data)
        .expect("data dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("buffer.redb.corrupt-")
        })
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the damaged file is kept beside the new one"
    );
    central.wait_for("the buffer_lost gap notice", SOON, |r| {
        r.iter().any(|m| {
            m.topic == "up/gap" && String::from_utf8_lossy(&m.payload).contains("\"buffer_lost\"")
        })
    });
    // And the agent works on: a new message goes through.
    let st = mosquitto_client("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            "sensors/a",
            "-m",
            "after",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(st.success());
    central.wait_for("a message after the repair", SOON, |r| {
        r.iter().any(|m| m.payload == b"after")
    });
}

#[test]
fn the_data_dir_is_private_and_permission_errors_name_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = dir.path().join("data");
    let config = agent_config(&data, "mqtt://127.0.0.1:1", "");
    // Created by the agent: owner-only.
    let mut agent = Agent::start(dir.path(), &config);
    assert_eq!(mode(&data), 0o700, "data_dir is not private");
    agent.terminate(SOON);

    // A config only root may read, read as nobody.
    let path = dir.path().join("edgerelay.toml");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = as_nobody(&["run", "--config", &path.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("edgerelay.toml") && err.contains("Permission denied"),
        "{err}"
    );

    // A readable config whose data_dir nobody may not enter.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = as_nobody(&["run", "--config", &path.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&data.display().to_string()) && err.contains("Permission denied"),
        "the error does not name the data_dir:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
