//! The .deb (packaging/deb.sh): installed for real with dpkg on this machine, its files,
//! conffile, user and unit checked, the installed agent validating the installed config,
//! a local edit to the config surviving a reinstall, and purge cleaning up. Needs root
//! and dpkg (Debian); it fails, not skips, without them.

use std::path::Path;
use std::process::{Command, Output};

use edgerelay_tests::*;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

#[test]
fn the_deb_installs_a_working_service_and_purges_cleanly() {
    assert!(
        linklab::is_root(),
        "this test installs a package with dpkg: run it as root (sudo scripts/test.sh)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    // The test binary is the test-hooks build (hooks inert without their variables);
    // stripped, as a release build is, so dpkg-deb has less to compress.
    let bin = dir.path().join("edgerelay");
    run(Command::new("strip").arg("-o").arg(&bin).arg(agent_bin()));
    let deb = stdout(
        Command::new(root.join("packaging/deb.sh"))
            .args(["amd64"])
            .arg(&bin)
            .arg(dir.path()),
    );
    let deb = deb.trim();
    // A leftover from an interrupted run must not hide what this one installs.
    let _ = Command::new("dpkg").args(["--purge", "edgerelay"]).output();

    run(Command::new("dpkg").args(["-i", deb]));
    for f in [
        "/usr/bin/edgerelay",
        "/etc/edgerelay/edgerelay.toml",
        "/lib/systemd/system/edgerelay.service",
        "/usr/share/doc/edgerelay/copyright",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let conffiles = stdout(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "edgerelay"]));
    assert!(
        conffiles.contains("/etc/edgerelay/edgerelay.toml"),
        "the config is a conffile: {conffiles:?}"
    );
    let user = stdout(Command::new("getent").args(["passwd", "edgerelay"]));
    assert!(
        user.contains("nologin"),
        "a system user without a shell: {user}"
    );
    let state = std::fs::metadata("/var/lib/edgerelay").expect("/var/lib/edgerelay");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(state.permissions().mode() & 0o777, 0o700, "state dir mode");
    let uid: u32 = stdout(Command::new("id").args(["-u", "edgerelay"]))
        .trim()
        .parse()
        .expect("uid");
    assert_eq!(
        state.uid(),
        uid,
        "the state dir belongs to the service user"
    );

    let effective = stdout(Command::new("/usr/bin/edgerelay").args([
        "check-config",
        "--config",
        "/etc/edgerelay/edgerelay.toml",
    ]));
    assert!(effective.contains("[upstream]"), "{effective}");
    // systemd's own checker: directives, the ExecStart binary, the user.
    run(Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/edgerelay.service"]));
    let unit = std::fs::read_to_string("/lib/systemd/system/edgerelay.service").expect("unit");
    for line in [
        "Type=notify",
        "User=edgerelay",
        "StateDirectory=edgerelay",
        "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }

    // A conffile the admin edited is kept by an upgrade/reinstall.
    let edited = std::fs::read_to_string("/etc/edgerelay/edgerelay.toml").expect("config")
        + "\n# edited by the admin\n";
    std::fs::write("/etc/edgerelay/edgerelay.toml", &edited).expect("edit config");
    run(Command::new("dpkg").args(["--force-confold", "-i", deb]));
    assert_eq!(
        std::fs::read_to_string("/etc/edgerelay/edgerelay.toml").expect("config"),
        edited,
        "the admin's edit survived the reinstall"
    );

    run(Command::new("dpkg").args(["--purge", "edgerelay"]));
    for f in [
        "/usr/bin/edgerelay",
        "/etc/edgerelay/edgerelay.toml",
        "/lib/systemd/system/edgerelay.service",
        "/var/lib/edgerelay",
    ] {
        assert!(!Path::new(f).exists(), "{f} left after purge");
    }
    let gone = Command::new("getent")
        .args(["passwd", "edgerelay"])
        .output()
        .expect("getent");
    assert!(
        !gone.status.success(),
        "the service user is removed on purge"
    );
}
