//! The upstream connections run the congestion control `[upstream] congestion` names —
//! BBR by default, which keeps a lossy link full where CUBIC carries a fraction of it —
//! as the kernel itself reports them (`ss`), and the agent says which it runs; one the
//! kernel does not have is a warning, not an outage.

use std::process::Command;
use std::time::Duration;

use edgerelay_tests::*;

/// The congestion control of each established connection the agent's process has to
/// `port`, as `ss` shows it (the word before `wscale:` in a socket's details).
fn running_to(port: u16) -> Vec<String> {
    let out = Command::new("ss")
        .args([
            "-tinpH",
            "state",
            "established",
            "dport",
            &format!("= :{port}"),
        ])
        .output()
        .expect("ss (iproute2; scripts/deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut found = Vec::new();
    let mut ours = false;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            // A socket's first line: its addresses and owning process.
            ours = line.contains("\"edgerelay\"");
            continue;
        }
        if ours {
            let words: Vec<&str> = line.split_whitespace().collect();
            found.extend(
                words
                    .windows(2)
                    .filter(|w| w[1].starts_with("wscale:"))
                    .map(|w| w[0].to_owned()),
            );
        }
    }
    found
}

/// Start an agent uploading to a fresh broker with `congestion` (None: the default);
/// returns the agent (with its broker) once a message went through.
fn agent_with(dir: &std::path::Path, congestion: Option<&str>) -> (Agent, Mosquitto) {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let port = free_port();
    let mut cfg = agent_config(
        &dir.join("data"),
        &broker.url(),
        &format!("[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"lines\"\ntopic = \"t\"\n"),
    );
    if let Some(name) = congestion {
        cfg = cfg.replace(
            "[upstream]\n",
            &format!("[upstream]\ncongestion = \"{name}\"\n"),
        );
    }
    let agent = Agent::start(dir, &cfg);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::io::Write::write_all(&mut conn, b"hello\n").expect("write");
    sub.wait_for("the message upstream", SOON, |r| !r.is_empty());
    (agent, broker)
}

fn upstream_line(agent: &Agent) -> String {
    agent.wait_for_log("upstream congestion control", Duration::from_secs(10));
    agent
        .log_lines()
        .into_iter()
        .find(|l| l.contains("upstream congestion control"))
        .unwrap_or_default()
}

#[test]
fn bbr_by_default_and_what_is_configured_otherwise() {
    assert!(
        linklab::is_root(),
        "this test loads the tcp_bbr module through the agent: run it as root (scripts/test.sh)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, broker) = agent_with(dir.path(), None);
    assert_eq!(running_to(broker.port), ["bbr"], "the kernel's view");
    assert!(
        upstream_line(&agent).contains("congestion=bbr"),
        "the agent says so"
    );
    drop(agent);

    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, broker) = agent_with(dir.path(), Some("cubic"));
    assert_eq!(running_to(broker.port), ["cubic"]);
    assert!(upstream_line(&agent).contains("congestion=cubic"));
}

#[test]
fn one_the_kernel_lacks_is_a_warning_and_the_data_flows() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Passes validation (a well-formed name); the kernel has none such.
    let (agent, broker) = agent_with(dir.path(), Some("nosuchcc"));
    let line = upstream_line(&agent);
    assert!(
        line.contains("WARN") && line.contains("asked=\"nosuchcc\""),
        "{line}"
    );
    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .expect("the system's default")
        .trim()
        .to_owned();
    assert_eq!(running_to(broker.port), [system]);
}
