//! Without root the lab refuses with a clear message instead of half-working.

use std::process::{Command, Stdio};

#[test]
fn without_root_the_lab_refuses_clearly() {
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_linklab"))
        .arg("up")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs linklab as nobody");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
}
