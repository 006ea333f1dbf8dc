//! The binary's contract: check-config output and exit codes, start-up refusals with
//! clear errors, and a clean SIGTERM shutdown.

use std::process::Command;
use std::time::{Duration, Instant};

use edgerelay_tests::*;

fn check_config(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_reports_three_mistakes_at_once() {
    let (ok, _, err) = check_config(
        r#"
[agent]
gateway_id = "gw1"
data_dir = "/tmp/x"
colour = "blue"

[buffer]
max_size = "12 parsecs"

[upstream]
url = "mqtt://127.0.0.1:1883"
keep_alive = "forever"
"#,
    );
    assert!(!ok, "exit status must be non-zero");
    assert!(err.contains("3 errors"), "{err}");
    for key in ["agent.colour", "buffer.max_size", "upstream.keep_alive"] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
    assert!(err.contains("line 8"), "line of max_size in:\n{err}");
}

#[test]
fn check_config_prints_the_effective_config() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/edgerelay.toml"
    ))
    .expect("example config");
    let (ok, out, err) = check_config(&example);
    assert!(ok, "{err}");
    assert!(out.contains("gateway_id = \"gw-example-01\""), "{out}");
    assert!(out.contains("max_size = \"512MiB\""), "{out}");
    // The printed config is itself a valid config.
    let (ok, _, err) = check_config(&out);
    assert!(ok, "rendered config must validate: {err}");
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let _first = Agent::start(dir.path(), &agent_config(&data, &broker.url(), ""));
    let other = tempfile::tempdir().expect("tempdir");
    let mut second = Agent::spawn(other.path(), &agent_config(&data, &broker.url(), ""));
    let status = second.wait_exit(SOON);
    assert!(!status.success());
    let log = second.logs();
    assert!(
        log.contains("in use by another edgerelay process") && log.contains("buffer.redb"),
        "{log}"
    );
}

#[test]
fn a_corrupt_buffer_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let garbage: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(data.join("buffer.redb"), &garbage).expect("write");
    let mut agent = Agent::spawn(dir.path(), &agent_config(&data, "mqtt://127.0.0.1:1", ""));
    let status = agent.wait_exit(SOON);
    assert!(!status.success());
    let log = agent.logs();
    assert!(
        log.contains("corrupt") && log.contains("buffer.redb"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(data.join("buffer.redb")).expect("read"),
        garbage,
        "file untouched"
    );
}

#[test]
fn a_taken_port_fails_start_up_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let extra =
        format!("[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\ntopic = \"t\"\n");
    let mut agent = Agent::spawn(
        dir.path(),
        &agent_config(&dir.path().join("data"), "mqtt://127.0.0.1:1", &extra),
    );
    let status = agent.wait_exit(SOON);
    assert_eq!(status.code(), Some(1));
    assert!(
        agent
            .logs()
            .contains(&format!("cannot listen on tcp://127.0.0.1:{port}")),
        "{}",
        agent.logs()
    );
}

#[test]
fn sigterm_stops_cleanly_and_quickly() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mqtt_port = free_port();
    let extra = format!(
        "[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\ntopic = \"t\"\n\n{}",
        local_mqtt_section(mqtt_port, r##"["#"]"##, "")
    );
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(&dir.path().join("data"), &broker.url(), &extra),
    );
    agent.wait_for_log("connected upstream", SOON);
    // Idle client connections (a socket and an MQTT client) must not hold up shutdown.
    let _idle = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut mqtt = std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).expect("connect");
    use std::io::{Read, Write};
    mqtt.write_all(&[
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'x',
    ])
    .expect("CONNECT");
    let mut connack = [0u8; 4];
    mqtt.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let started = Instant::now();
    let status = agent.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        agent.logs()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let log = agent.logs();
    assert!(
        log.contains("disconnected upstream"),
        "clean MQTT disconnect; log:\n{log}"
    );
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn decode_prints_the_committed_vectors_as_json_lines() {
    let vectors = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
    for name in ["batch-v1-none", "batch-v1-zstd", "batch-v1-zstd-dict"] {
        let out = Command::new(agent_bin())
            .arg("decode")
            .arg("--dict-dir")
            .arg(&vectors)
            .arg(vectors.join(format!("{name}.bin")))
            .output()
            .expect("decode");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected =
            std::fs::read_to_string(vectors.join(format!("{name}.jsonl"))).expect("jsonl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{name}");
    }
    // Without the dictionary: a clear error, non-zero exit.
    let out = Command::new(agent_bin())
        .arg("decode")
        .arg(vectors.join("batch-v1-zstd-dict.bin"))
        .output()
        .expect("decode");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dictionary 9d458e698715ecd5 is not known")
    );
    // Garbage on standard input: an error for that input, not a panic.
    let mut child = Command::new(agent_bin())
        .arg("decode")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("decode");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"not a batch at all")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"));
}

/// Under systemd (`Type=notify`, packaging/edgerelay.service) the unit is "started" only
/// when READY=1 arrives: by then the local listener must accept, and on SIGTERM the agent
/// says STOPPING=1 before it closes down.
#[test]
fn tells_systemd_it_is_ready_once_listening_and_when_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    manager.set_read_timeout(Some(SOON)).expect("read timeout");
    let broker = Mosquitto::start();
    let port = free_port();
    let config = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &local_mqtt_section(port, "[\"#\"]", ""),
    );
    let mut agent = Agent::spawn_with_env(
        dir.path(),
        &config,
        &[("NOTIFY_SOCKET", sock_path.to_str().expect("utf-8 path"))],
    );
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    std::net::TcpStream::connect(("127.0.0.1", port))
        .expect("the local MQTT listener accepts once READY=1 was sent");
    let status = agent.terminate(SOON);
    assert!(status.success(), "clean stop: {status:?}\n{}", agent.logs());
    let n = manager.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1");
}
