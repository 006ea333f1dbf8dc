//! Disk full (issue 10): data_dir on a small tmpfs the test mounts (root), with
//! `max_size` far above what it holds. The agent narrows its budget to the disk and
//! applies `when_full` — reject-new holds the sender (no acknowledgement), drop-oldest
//! evicts with a `disk_full` gap notice — and, when another process fills the disk so
//! that a commit fails with ENOSPC, acknowledges nothing of it, reopens the file and
//! resumes once space returns. Every acknowledged message reaches the central broker.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgerelay_tests::*;

const SOON: Duration = Duration::from_secs(30);
const MSG: usize = 16 * 1024;

/// A tmpfs of `size` mounted for the test; unmounted when dropped.
struct SmallFs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).expect("mkdir");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (run the suite with sudo scripts/test.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { path, _dir: dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A length-prefixed TCP socket with an ack byte per committed message, topic "df".
fn socket_section(port: u16, when_full: &str) -> String {
    format!(
        "[buffer]\nmax_size = \"512MiB\"\nwhen_full = \"{when_full}\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"df\"\nack = true\nmax_message_size = \"64KiB\"\n"
    )
}

/// Sends `total` numbered messages and counts acknowledgements, in threads.
struct Feeder {
    acked: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(port: u16, total: usize) -> Self {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut reader = conn.try_clone().expect("clone");
        let acked = Arc::new(AtomicUsize::new(0));
        let counter = acked.clone();
        let acks = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while counter.load(Ordering::SeqCst) < total {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        counter.fetch_add(n, Ordering::SeqCst);
                    }
                }
            }
        });
        let writer = std::thread::spawn(move || {
            for i in 0..total {
                let mut payload = format!("df-{i}-").into_bytes();
                payload.resize(MSG, b'.');
                if conn.write_all(&frame(&payload)).is_err() {
                    break;
                }
            }
        });
        Self {
            acked,
            threads: vec![acks, writer],
        }
    }

    fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    fn join(self) -> usize {
        for t in self.threads {
            t.join().expect("feeder thread");
        }
        self.acked.load(Ordering::SeqCst)
    }
}

fn ids(got: &[Received]) -> HashSet<usize> {
    got.iter()
        .filter(|r| r.topic == "up/df")
        .filter_map(|r| {
            let s = String::from_utf8_lossy(&r.payload[..r.payload.len().min(32)]).into_owned();
            s.strip_prefix("df-")?.split('-').next()?.parse().ok()
        })
        .collect()
}

fn used_percent(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=pcent"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().trim_end_matches('%').parse().ok())
        .unwrap_or(0)
}

#[test]
fn reject_new_on_a_full_disk_holds_the_sender_and_loses_nothing() {
    let fs = SmallFs::mount("16m");
    let mut broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    broker.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = agent_config(
        &fs.path.join("data"),
        &broker.url(),
        &socket_section(port, "reject-new"),
    );
    let agent = Agent::start(dir.path(), &config);
    let total = 1200; // ~19 MiB: more than the filesystem holds
    let feeder = Feeder::start(port, total);
    agent.wait_for_log("buffer full (reject-new)", SOON);
    let at_full = feeder.acked();
    assert!(at_full > 100 && at_full < total, "acknowledged {at_full}");
    assert!(
        !agent.logs().contains("buffer commit failed"),
        "the disk filled up under a commit; the budget should have stopped first:\n{}",
        agent.logs()
    );
    eprintln!(
        "reject-new: {at_full} of {total} acknowledged when the 16 MiB disk was {}% used",
        used_percent(&fs.path)
    );
    broker.restart();
    assert_eq!(
        feeder.join(),
        total,
        "every message acknowledged once space returned"
    );
    sub.wait_for("every message upstream", Duration::from_secs(90), |got| {
        ids(got).len() == total
    });
}

#[test]
fn drop_oldest_on_a_full_disk_evicts_with_a_disk_full_gap() {
    let fs = SmallFs::mount("16m");
    let mut broker = Mosquitto::start();
    broker.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = agent_config(
        &fs.path.join("data"),
        &broker.url(),
        &socket_section(port, "drop-oldest"),
    );
    let agent = Agent::start(dir.path(), &config);
    let total = 1200;
    let feeder = Feeder::start(port, total);
    assert_eq!(
        feeder.join(),
        total,
        "drop-oldest acknowledges every message"
    );
    assert!(
        !agent.logs().contains("buffer commit failed"),
        "{}",
        agent.logs()
    );
    broker.restart();
    let mut sub = Subscriber::start(broker.port, "up/#");
    sub.wait_for("a disk_full gap notice", SOON, |got| {
        got.iter().any(|r| {
            r.topic == "up/gap" && String::from_utf8_lossy(&r.payload).contains("\"disk_full\"")
        })
    });
    // What arrived plus what the notices say was dropped is everything, and the newest
    // message was kept.
    sub.wait_for("the newest message", SOON, |got| {
        ids(got).contains(&(total - 1))
    });
    let dropped: u64 = sub
        .received
        .iter()
        .filter(|r| r.topic == "up/gap")
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
        .filter(|v| v["reason"] == "disk_full")
        .filter_map(|v| v["count"].as_u64())
        .sum();
    sub.wait_for("the rest of the kept messages", SOON, |got| {
        ids(got).len() as u64 + dropped >= total as u64
    });
    let arrived = ids(&sub.received).len();
    assert_eq!(
        arrived as u64 + dropped,
        total as u64,
        "arrived {arrived}, dropped {dropped}"
    );
    assert!(
        dropped > 0 && arrived > 100,
        "arrived {arrived}, dropped {dropped}"
    );
}

#[test]
fn enospc_in_the_middle_of_a_commit_acknowledges_nothing_and_resumes() {
    let fs = SmallFs::mount("24m");
    let mut broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    broker.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = agent_config(
        &fs.path.join("data"),
        &broker.url(),
        &socket_section(port, "reject-new"),
    );
    let agent = Agent::start(dir.path(), &config);
    // Another process takes all the space the agent thought it had: its next commits
    // need pages the filesystem no longer has.
    let filler = fs.path.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0xEEu8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let total = 600;
    let feeder = Feeder::start(port, total);
    agent.wait_for_log("buffer commit failed", SOON);
    let during = feeder.acked();
    eprintln!("ENOSPC: {during} of {total} acknowledged while the disk was full");
    assert!(during < total);
    std::fs::remove_file(&filler).expect("free the space");
    agent.wait_for_log("buffer file reopened", SOON);
    broker.restart();
    assert_eq!(
        feeder.join(),
        total,
        "every message acknowledged once space returned"
    );
    sub.wait_for("every message upstream", Duration::from_secs(90), |got| {
        ids(got).len() == total
    });
    assert!(!agent.logs().contains("panicked"));
}
