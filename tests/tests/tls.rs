//! TLS (issue 10): the upstream over `mqtts://` against a real mosquitto that requires
//! client certificates, with a CA and certificates this test generates with openssl;
//! the server verified (a certificate from another CA is refused); the optional TLS
//! local listener with mosquitto_pub; secrets never in the log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgerelay_tests::*;

const SECRET: &str = "pw-7f3a9c-never-logged";

/// A CA and certificates signed by it: `server` (localhost, 127.0.0.1) and `client`;
/// `other-ca` is a second, unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let bin = if Path::new("/usr/bin/openssl").exists() {
        "/usr/bin/openssl"
    } else {
        panic!("`openssl` is not installed: these tests need the Debian package `openssl` (scripts/test.sh installs it)")
    };
    let out = Command::new(bin)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn generate() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (key, pem, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=edgerelay test {ca}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &pem,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(d, &args);
        }
        for (name, ext) in [
            (
                "server",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(d.join(format!("{name}.ext")), ext).expect("write ext");
            let (key, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let subj = format!(
                "/CN={}",
                if name == "server" {
                    "localhost"
                } else {
                    "gw-test"
                }
            );
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(d, &args);
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        // mosquitto drops to its own user: it must read the server's files.
        Command::new("chmod")
            .args(["-R", "a+rX", &d.display().to_string()])
            .status()
            .expect("chmod");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// mosquitto with its usual plain listener (for the test's subscriber) and a TLS one
/// that requires a client certificate from the CA.
fn tls_broker(pki: &Pki) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let broker = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.path("ca.pem").display(),
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
    ));
    wait_for_port(([127, 0, 0, 1], tls_port).into(), Duration::from_secs(10));
    (broker, tls_port)
}

fn upstream_tls(pki: &Pki, ca: &str, client_cert: bool) -> String {
    let mut s = format!("ca_file = \"{}\"\n", pki.path(ca).display());
    if client_cert {
        s += &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            pki.path("client.pem").display(),
            pki.path("client.key").display()
        );
    }
    s
}

/// An agent config whose upstream is `url` with `tls` keys and a password, a local
/// MQTT endpoint on `port` (`local_extra` appended to it).
fn config(dir: &Path, url: &str, tls: &str, port: u16, local_extra: &str) -> String {
    let base = agent_config(
        &dir.join("data"),
        url,
        &local_mqtt_section(port, r#"["sensors/#"]"#, local_extra),
    );
    // The [upstream] keys go right after its url.
    base.replacen(
        &format!("url = \"{url}\"\n"),
        &format!("url = \"{url}\"\n{tls}username = \"gw\"\npassword = \"{SECRET}\"\n"),
        1,
    )
}

fn publish(port: u16, extra: &[&str], topic: &str, msg: &str) -> bool {
    mosquitto_client("mosquitto_pub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            msg,
        ])
        .args(extra)
        .status()
        .expect("mosquitto_pub")
        .success()
}

#[test]
fn upstream_over_mqtts_with_a_client_certificate_delivers_and_never_logs_secrets() {
    let pki = Pki::generate();
    let (broker, tls_port) = tls_broker(&pki);
    let mut central = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("mqtts://localhost:{tls_port}");
    let cfg = config(
        dir.path(),
        &url,
        &upstream_tls(&pki, "ca.pem", true),
        port,
        "",
    );
    let agent = Agent::start_with_env(dir.path(), &cfg, &[("EDGERELAY_LOG", "trace")]);
    for i in 0..20 {
        assert!(publish(
            port,
            &[],
            &format!("sensors/t{i}"),
            &format!("over-tls-{i}")
        ));
    }
    central.wait_for(
        "20 messages relayed over TLS",
        Duration::from_secs(20),
        |r| {
            (0..20).all(|i| {
                r.iter()
                    .any(|m| m.payload == format!("over-tls-{i}").as_bytes())
            })
        },
    );
    // The TLS listener of the broker is the only way in: it saw a client certificate.
    assert!(
        broker.log().contains("New client connected")
            && broker.log().contains(&format!(" on port {tls_port}")),
        "mosquitto did not see the agent on its TLS port:\n{}",
        broker.log()
    );
    // The effective config (check-config prints it) masks the password; the
    // trace-level log never shows it.
    let printed = Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(dir.path().join("edgerelay.toml"))
        .output()
        .expect("check-config");
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(
        printed.contains("ca_file") && printed.contains("***"),
        "{printed}"
    );
    assert!(!printed.contains(SECRET), "check-config shows the password");
    let logs = agent.logs();
    assert!(logs.contains(" TRACE "), "not logging at trace");
    assert!(!logs.contains(SECRET), "the password is in the agent's log");
    let key = std::fs::read_to_string(pki.path("client.key")).expect("key");
    let key_body = key.lines().nth(1).expect("a key line");
    assert!(!logs.contains(key_body), "the client key is in the log");
}

#[test]
fn a_server_from_another_ca_or_a_missing_client_certificate_is_refused() {
    let pki = Pki::generate();
    let (broker, tls_port) = tls_broker(&pki);
    let mut central = Subscriber::start(broker.port, "up/#");
    let url = format!("mqtts://localhost:{tls_port}");
    for (ca, client_cert, expect) in [
        ("other-ca.pem", true, "UnknownIssuer"),
        ("ca.pem", false, "CertificateRequired"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let cfg = config(
            dir.path(),
            &url,
            &upstream_tls(&pki, ca, client_cert),
            port,
            "",
        );
        let agent = Agent::start(dir.path(), &cfg);
        assert!(publish(port, &[], "sensors/refused", ca));
        agent.wait_for_log(expect, Duration::from_secs(20));
        // Kept, not sent: the message is acknowledged locally and waits in the buffer.
        central.drain();
        assert!(
            central.received.iter().all(|m| m.payload != ca.as_bytes()),
            "delivered through a TLS session that should have failed ({ca})"
        );
    }
}

#[test]
fn the_local_listener_speaks_tls_when_given_a_certificate() {
    let pki = Pki::generate();
    let broker = Mosquitto::start();
    let mut central = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let local_tls = format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    );
    let cfg = config(dir.path(), &broker.url(), "", port, &local_tls);
    let _agent = Agent::start(dir.path(), &cfg);
    let ca = pki.path("ca.pem").display().to_string();
    assert!(publish(
        port,
        &["--cafile", &ca],
        "sensors/tls",
        "local-tls"
    ));
    central.wait_for("the TLS client's message", Duration::from_secs(20), |r| {
        r.iter().any(|m| m.payload == b"local-tls")
    });
    // A plain client gets nowhere on a TLS listener.
    assert!(
        !publish(port, &[], "sensors/plain", "plain"),
        "a plain MQTT client was served on the TLS listener"
    );
}

#[test]
fn missing_or_malformed_tls_files_are_named_by_check_config() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("garbage.pem"), "-----BEGIN NOTHING-----\n").expect("write");
    let cases = [
        (
            format!(
                "ca_file = \"{}\"\n",
                dir.path().join("absent.pem").display()
            ),
            "upstream.ca_file",
            "absent.pem",
        ),
        (
            format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                pki.path("client.pem").display(),
                dir.path().join("garbage.pem").display()
            ),
            "upstream.key_file",
            "no PEM private key",
        ),
        (
            format!("cert_file = \"{}\"\n", pki.path("client.pem").display()),
            "upstream.cert_file",
            "both",
        ),
    ];
    for (tls, key, words) in cases {
        let cfg = config(dir.path(), "mqtts://localhost:8883", &tls, free_port(), "");
        let path = dir.path().join("edgerelay.toml");
        std::fs::write(&path, cfg).expect("write config");
        let out = Command::new(agent_bin())
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("check-config");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: accepted");
        assert!(err.contains(key) && err.contains(words), "{key}: {err}");
    }
    // TLS files with a plain URL are a mistake worth naming.
    let cfg = config(
        dir.path(),
        "mqtt://localhost:1883",
        &format!("ca_file = \"{}\"\n", pki.path("ca.pem").display()),
        free_port(),
        "",
    );
    std::fs::write(dir.path().join("edgerelay.toml"), cfg).expect("write");
    let out = Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(dir.path().join("edgerelay.toml"))
        .output()
        .expect("check-config");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("need an mqtts:// url"));
}
