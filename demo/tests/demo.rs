//! The demo in its short mode, as a user runs it: the example binary (built by
//! `cargo test` with the package's examples), `--duration 10s`, judged by its own
//! summary — exit status, the verdict line and the table's numbers.

use std::path::PathBuf;
use std::process::Command;

/// target/<profile>/examples/demo, beside this test's own binary (target/<profile>/deps).
fn demo_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let bin = profile_dir.join("examples").join("demo");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test -p edgerelay-demo` builds the example",
        bin.display()
    );
    bin
}

#[test]
fn the_short_demo_proves_every_acknowledged_message_arrived() {
    let out = Command::new(demo_bin())
        .args([
            "--duration",
            "10s",
            "--devices",
            "20",
            "--drain-limit",
            "60s",
        ])
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed\n{text}\n{err}");

    // The live view ran through the link's phases.
    for phase in ["GOOD", "DEGRADED", "OUTAGE", "RECOVERED"] {
        assert!(
            text.contains(&format!("link: {phase} (")),
            "{phase} in\n{text}"
        );
    }
    assert!(text.contains("backlog "), "{text}");

    // The summary's verdict, and its table agreeing with it.
    let result = text
        .lines()
        .find(|l| l.starts_with("RESULT: "))
        .unwrap_or_else(|| panic!("no RESULT line in\n{text}"));
    assert!(
        result.starts_with("RESULT: OK: every acknowledged message arrived exactly once"),
        "{result}"
    );
    let total: Vec<u64> = text
        .lines()
        .find(|l| l.starts_with("total "))
        .unwrap_or_else(|| panic!("no total row in\n{text}"))
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().expect("a number"))
        .collect();
    let [published, acked, arrived, missing] = total[..] else {
        panic!("total row: {total:?}");
    };
    // 20 devices at 2 msg/s, a PLC at 20/s, an app at 5/s, alarms: hundreds in 10 s.
    assert!(acked >= 400, "{text}");
    assert!(published >= acked);
    assert_eq!((arrived, missing), (acked, 0), "{text}");
    assert!(
        result.contains(&format!("({acked} of {acked})")),
        "{result}"
    );
    for source in [
        "mqtt telemetry",
        "mqtt alarms (high)",
        "tcp plc log (low)",
        "unix app events",
    ] {
        let row = text
            .lines()
            .find(|l| l.starts_with(source))
            .unwrap_or_else(|| panic!("no row for {source}"));
        let acked: u64 = row
            .split_whitespace()
            .rev()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(acked > 0, "every kind of source was acknowledged: {row}");
    }
    assert!(
        text.contains("duplicates: 0 records twice in unpack's output, 0 messages under two records; 0 foreign records"),
        "{text}"
    );
}
