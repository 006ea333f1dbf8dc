//! The benchmark harness end to end, in its quick mode: both systems on a clean link and
//! through a short outage with a SIGKILL, the table, the target lines and both plots.
//! The figures are not checked here (a short run on a busy CI machine says little);
//! that every case delivered and was measured, and that edgerelay lost nothing it
//! acknowledged, is checked by the harness itself (its exit status).

use std::process::Command;

#[test]
fn quick_mode_runs_end_to_end() {
    assert!(
        linklab::is_root(),
        "the benchmark harness needs root (network namespaces): run the suite as root, e.g. `sudo scripts/test.sh`"
    );
    let out = tempfile::tempdir().expect("tempdir");
    let run = Command::new(env!("CARGO_BIN_EXE_bridge_bench"))
        .args(["--quick", "--out"])
        .arg(out.path())
        .output()
        .expect("run bridge_bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "bridge_bench --quick failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    for row in [
        "| telemetry | clean | mosquitto bridge |",
        "| telemetry | clean | edgerelay |",
        "| telemetry | mosquitto bridge |",
        "| telemetry | edgerelay |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
    for target in [
        "upstream bytes/msg",
        "CPU per message",
        "lost after SIGKILL",
    ] {
        assert!(stdout.contains(target), "no {target:?} line in:\n{stdout}");
    }
    for plot in ["bench-goodput.svg", "bench-bytes.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).expect("plot written");
        assert!(
            svg.starts_with("<svg") && svg.contains("<rect") && svg.contains("edgerelay"),
            "{plot} is not a plot of both systems"
        );
    }
}
