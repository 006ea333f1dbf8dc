//! The local MQTT endpoint with real third-party clients: mosquitto_pub/mosquitto_sub,
//! Python paho-mqtt and rumqttc, end to end to a real central mosquitto.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use edgerelay_tests::*;

struct Setup {
    _broker: Mosquitto,
    central: Subscriber,
    agent: Agent,
    port: u16,
    _dir: tempfile::TempDir,
}

fn setup(topics: &str, extra: &str, env: &[(&str, &str)]) -> Setup {
    let broker = Mosquitto::start();
    let central = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &local_mqtt_section(port, topics, extra),
    );
    // Ready means the listener is bound: no probe connection, which would hold one of
    // `max_connections` until the agent saw it close (a race under qemu).
    let agent = Agent::start_with_env(dir.path(), &config, env);
    Setup {
        _broker: broker,
        central,
        agent,
        port,
        _dir: dir,
    }
}

#[test]
fn mosquitto_clients_all_qos_both_protocol_versions() {
    let mut s = setup(r#"["sensors/#"]"#, "", &[]);
    let port = s.port.to_string();
    // A local subscriber on the agent itself: gets relayed and local-only topics alike.
    let local = MosquittoSub::start(&["-p", &port, "-t", "#", "-q", "1", "-v", "-V", "mqttv311"]);
    let mut expected = HashSet::new();
    for version in ["mqttv311", "mqttv5"] {
        for qos in ["0", "1", "2"] {
            let topic = format!("sensors/{version}/q{qos}");
            let msg = format!("{version}-qos{qos}");
            let st = mosquitto_client("mosquitto_pub")
                .args([
                    "-p", &port, "-V", version, "-q", qos, "-t", &topic, "-m", &msg,
                ])
                .status()
                .expect("mosquitto_pub");
            assert!(st.success(), "mosquitto_pub {version} qos {qos}");
            expected.insert((format!("up/{topic}"), msg));
        }
    }
    let st = mosquitto_client("mosquitto_pub")
        .args([
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "local/only",
            "-m",
            "stays-here",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(st.success());

    s.central.wait_for("six relayed messages", SOON, |got| {
        let have: HashSet<(String, String)> = got
            .iter()
            .map(|r| {
                (
                    r.topic.clone(),
                    String::from_utf8_lossy(&r.payload).into_owned(),
                )
            })
            .collect();
        expected.is_subset(&have)
    });
    local.wait_for(
        "local fan-out of all seven",
        |l| {
            l.iter()
                .filter(|x| x.starts_with("sensors/") || x.starts_with("local/"))
                .count()
                >= 7
        },
        SOON,
    );
    assert!(local
        .messages()
        .iter()
        .any(|m| m == "local/only stays-here"));
    s.central.drain();
    assert!(
        s.central
            .received
            .iter()
            .all(|r| !r.topic.contains("local/only")),
        "unrelayed topic never goes upstream"
    );
}

#[test]
fn paho_publishes_and_subscribes_locally() {
    let mut s = setup(r##"["#"]"##, "", &[]);
    let script = r#"
import sys, threading
import paho.mqtt.client as mqtt
port, proto = int(sys.argv[1]), sys.argv[2]
version = mqtt.MQTTv5 if proto == "5" else mqtt.MQTTv311
got = []
done = threading.Event()
subscribed = threading.Event()
c = mqtt.Client(client_id="paho-" + proto, protocol=version)
def on_message(client, userdata, msg):
    got.append(msg.payload.decode())
    if len(got) == 3:
        done.set()
c.on_message = on_message
c.on_subscribe = lambda *a: subscribed.set()
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
c.subscribe("paho/#", qos=1)
assert subscribed.wait(20), "no SUBACK"
infos = [c.publish("paho/v%s/q%d" % (proto, q), "paho-v%s-q%d" % (proto, q), qos=q) for q in (0, 1, 2)]
for i in infos:
    i.wait_for_publish(20)
    assert i.is_published()
assert done.wait(20), "local fan-out missing: %r" % got
print(sorted(got))
c.disconnect()
c.loop_stop()
"#;
    for proto in ["4", "5"] {
        let out = python_with_paho()
            .args(["-c", script, &s.port.to_string(), proto])
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "paho v{proto} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    s.central
        .wait_for("paho's six messages upstream", SOON, |got| {
            let have: HashSet<String> = got
                .iter()
                .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
                .collect();
            ["4", "5"]
                .iter()
                .all(|p| (0..3).all(|q| have.contains(&format!("paho-v{p}-q{q}"))))
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_is_not_acknowledged_before_the_commit() {
    let hold_dir = tempfile::tempdir().expect("tempdir");
    let hold = hold_dir.path().join("hold");
    std::fs::write(&hold, b"").expect("hold file");
    let hold_str = hold.display().to_string();
    let mut s = tokio::task::block_in_place(|| {
        setup(
            r##"["#"]"##,
            "",
            &[("EDGERELAY_TEST_HOLD_COMMITS", &hold_str)],
        )
    });

    let mut opts = rumqttc::MqttOptions::new("held", "127.0.0.1", s.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish(
            "held/topic",
            rumqttc::QoS::AtLeastOnce,
            false,
            "must-be-durable",
        )
        .await
        .expect("publish");
    let mut sent = false;
    // Until the writer holds the commit, just drive the connection.
    while !s.agent.logs().contains("test hook: holding commit") {
        let ev = tokio::time::timeout(SOON, events.poll())
            .await
            .expect("event in time")
            .expect("connection");
        if let rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_)) = ev {
            sent = true;
        }
        assert!(
            !matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))),
            "PUBACK before the commit"
        );
        if sent {
            tokio::task::block_in_place(|| s.agent.wait_for_log("test hook: holding commit", SOON));
        }
    }
    // The commit is held: whatever arrives in this window must not be a PUBACK.
    let window = tokio::time::sleep(Duration::from_millis(500));
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = &mut window => break,
            ev = events.poll() => {
                let ev = ev.expect("connection");
                assert!(!matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))), "PUBACK while the commit is held");
            }
        }
    }
    std::fs::remove_file(&hold).expect("release");
    loop {
        let ev = tokio::time::timeout(SOON, events.poll())
            .await
            .expect("PUBACK after release")
            .expect("connection");
        if matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) {
            break;
        }
    }
    assert!(s.agent.logs().contains("test hook: commit released"));
    tokio::task::block_in_place(|| {
        s.central
            .wait_for("the held message upstream", SOON, |got| {
                got.iter().any(|r| r.payload == b"must-be-durable")
            })
    });
}

/// The spec's response to each kind of bad input, over raw TCP; a well-behaved client
/// is served all the while.
#[test]
fn bad_input_gets_the_spec_response() {
    let mut s = setup(
        r##"["#"]"##,
        "max_packet_size = \"1KiB\"\nconnect_timeout = \"1s\"\n",
        &[],
    );
    let port = s.port;
    let connect_v4 = |id: &str, clean: bool, keep_alive: u16| -> Vec<u8> {
        let mut c = Vec::new();
        let flags: u8 = if clean { 0x02 } else { 0x00 };
        let mut var = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags];
        var.extend_from_slice(&keep_alive.to_be_bytes());
        var.extend_from_slice(&(id.len() as u16).to_be_bytes());
        var.extend_from_slice(id.as_bytes());
        c.push(0x10);
        c.push(var.len() as u8);
        c.extend_from_slice(&var);
        c
    };
    let read_all = |mut t: TcpStream| -> Vec<u8> {
        t.set_read_timeout(Some(SOON)).expect("timeout");
        let mut v = Vec::new();
        let _ = t.read_to_end(&mut v);
        v
    };
    let conn = || TcpStream::connect(("127.0.0.1", port)).expect("connect");

    // MQTT 3.1 ("MQIsdp", level 3): CONNACK 0x01 (unacceptable protocol version), close.
    let mut t = conn();
    t.write_all(&[
        0x10, 0x0e, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00,
        0x00,
    ])
    .expect("write");
    assert_eq!(read_all(t), vec![0x20, 0x02, 0x00, 0x01]);

    // A PUBLISH before CONNECT: closed without a word.
    let mut t = conn();
    t.write_all(&[0x30, 0x03, 0x00, 0x01, b'a']).expect("write");
    assert!(read_all(t).is_empty());

    // Empty client id with a persistent session (3.1.1): CONNACK 0x02.
    let mut t = conn();
    t.write_all(&connect_v4("", false, 30)).expect("write");
    assert_eq!(read_all(t), vec![0x20, 0x02, 0x00, 0x02]);

    // After CONNECT: a wildcard in a PUBLISH topic, a second CONNECT, an oversize packet
    // — each closes that connection right after the CONNACK.
    let bad_after_connect: [&[u8]; 3] = [
        &[0x32, 0x07, 0x00, 0x03, b'a', b'/', b'#', 0x00, 0x01],
        &connect_v4("again", true, 30),
        &[0x30, 0x80, 0x80, 0x01],
    ];
    for (i, bad) in bad_after_connect.iter().enumerate() {
        let mut t = conn();
        t.write_all(&connect_v4(&format!("bad-{i}"), true, 30))
            .expect("write");
        t.write_all(bad).expect("write");
        assert_eq!(
            read_all(t),
            vec![0x20, 0x02, 0x00, 0x00],
            "case {i}: only the CONNACK, then close"
        );
    }

    // Keep-alive of 1 s and then silence: closed after 1.5 s.
    let mut t = conn();
    t.write_all(&connect_v4("sleepy", true, 1)).expect("write");
    let started = std::time::Instant::now();
    assert_eq!(read_all(t), vec![0x20, 0x02, 0x00, 0x00]);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "closed too early: {:?}",
        started.elapsed()
    );

    // Slowloris: connect and never send CONNECT — closed after connect_timeout.
    let t = conn();
    assert!(read_all(t).is_empty());

    // Garbage.
    let mut t = conn();
    let _ = t.write_all(&[0xff; 64]);
    assert!(read_all(t).is_empty());

    // Meanwhile a normal client is served.
    let st = mosquitto_client("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            "still/fine",
            "-m",
            "ok",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(st.success());
    s.central.wait_for("the good message", SOON, |got| {
        got.iter().any(|r| r.payload == b"ok")
    });
    s.agent.wait_for_log("closing client connection", SOON);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clients_beside_a_misbehaving_one() {
    let mut s = tokio::task::block_in_place(|| setup(r##"["#"]"##, "", &[]));
    let port = s.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let vandal_stop = stop.clone();
    let vandal = std::thread::spawn(move || {
        let mut rounds = 0u32;
        while !vandal_stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(mut t) = TcpStream::connect(("127.0.0.1", port)) {
                let junk: Vec<u8> = (0..200).map(|_| rand::random::<u8>()).collect();
                let _ = t.write_all(&junk);
            }
            rounds += 1;
        }
        rounds
    });
    const CLIENTS: usize = 100;
    const EACH: usize = 20;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(format!("dev-{c}"), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30));
            let (client, mut events) = rumqttc::AsyncClient::new(opts, EACH + 4);
            for i in 0..EACH {
                client
                    .publish(
                        format!("fleet/dev-{c}"),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        format!("d{c}-m{i}"),
                    )
                    .await
                    .expect("queue publish");
            }
            let mut acked = 0;
            while acked < EACH {
                match tokio::time::timeout(SOON, events.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("client {c}: {e}"),
                    Err(_) => panic!("client {c}: no PUBACK in time ({acked} acked)"),
                }
            }
            client.disconnect().await.ok();
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = vandal.join().expect("vandal");
    assert!(rounds > 0);
    tokio::task::block_in_place(|| {
        s.central
            .wait_for("2000 messages from 100 clients", SOON, |got| {
                let have: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_slice()).collect();
                (0..CLIENTS)
                    .all(|c| (0..EACH).all(|i| have.contains(format!("d{c}-m{i}").as_bytes())))
            })
    });
}

#[test]
fn password_file_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hashed = std::process::Command::new(agent_bin())
        .args(["hash-password", "dev1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .expect("stdin")
                .write_all(b"correct horse\n")?;
            c.wait_with_output()
        })
        .expect("hash-password");
    assert!(hashed.status.success());
    let line = String::from_utf8(hashed.stdout).expect("utf8");
    assert!(line.starts_with("dev1:$argon2id$"), "{line}");
    let pw = dir.path().join("passwords");
    std::fs::write(&pw, &line).expect("write");
    let mut s = setup(
        r##"["#"]"##,
        &format!("password_file = \"{}\"\n", pw.display()),
        &[],
    );
    let port = s.port.to_string();
    let publish = |user: &str, pass: &str| {
        mosquitto_client("mosquitto_pub")
            .args([
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                "auth/t",
                "-u",
                user,
                "-P",
                pass,
                "-m",
                &format!("{user}-{pass}"),
            ])
            .output()
            .expect("mosquitto_pub")
    };
    assert!(publish("dev1", "correct horse").status.success());
    let wrong = publish("dev1", "wrong");
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr)
            .to_lowercase()
            .contains("bad user name or password"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert!(!publish("nobody", "correct horse").status.success());
    let anon = mosquitto_client("mosquitto_pub")
        .args(["-p", &port, "-t", "auth/t", "-m", "anon"])
        .output()
        .expect("pub");
    assert!(
        !anon.status.success(),
        "anonymous refused when a password file is set"
    );
    s.central
        .wait_for("the authenticated message", SOON, |got| {
            got.iter().any(|r| r.payload == b"dev1-correct horse")
        });
    assert!(s
        .central
        .received
        .iter()
        .all(|r| r.payload != b"dev1-wrong" && r.payload != b"anon"));
    s.agent.wait_for_log("authentication failed", SOON);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_gets_quota_exceeded_when_the_buffer_is_full() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut broker = tokio::task::block_in_place(Mosquitto::start);
    broker.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &format!(
            "[buffer]\nmax_size = \"32MiB\"\nwhen_full = \"reject-new\"\n\n{}",
            local_mqtt_section(port, r##"["#"]"##, "max_packet_size = \"1MiB\"\n")
        ),
    );
    let _agent = tokio::task::block_in_place(|| Agent::start(dir.path(), &config));
    let mut opts = MqttOptions::new("v5-filler", "127.0.0.1", port);
    opts.set_max_packet_size(Some(4 << 20));
    let (client, mut events) = AsyncClient::new(opts, 8);
    let payload = vec![b'x'; 200 * 1024];
    let mut quota = false;
    let mut accepted = 0;
    let mut sent = 0;
    while !quota {
        assert!(sent < 400, "never refused: {accepted} accepted");
        client
            .publish(
                "fill/it",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await
            .expect("publish");
        sent += 1;
        loop {
            match tokio::time::timeout(SOON, events.poll())
                .await
                .expect("event")
                .expect("connection")
            {
                Event::Incoming(Packet::PubAck(ack)) => {
                    match ack.reason {
                        PubAckReason::Success => accepted += 1,
                        PubAckReason::QuotaExceeded => quota = true,
                        other => panic!("unexpected reason {other:?}"),
                    }
                    break;
                }
                _ => continue,
            }
        }
    }
    // 16 MiB of data budget / 200 KiB: about 80 accepted before the refusal.
    assert!((60..=90).contains(&accepted), "accepted {accepted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_client_id_takes_over_the_session() {
    let s = tokio::task::block_in_place(|| setup(r##"["#"]"##, "", &[]));
    let connect = |port: u16| {
        let mut opts = rumqttc::MqttOptions::new("same-id", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        rumqttc::AsyncClient::new(opts, 4)
    };
    let (_a, mut ea) = connect(s.port);
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) =
            ea.poll().await.expect("a connects")
        {
            break;
        }
    }
    let (_b, mut eb) = connect(s.port);
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) =
            eb.poll().await.expect("b connects")
        {
            break;
        }
    }
    // A is disconnected by the server.
    let ended = tokio::time::timeout(SOON, async {
        loop {
            if ea.poll().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the first connection was not closed");
}

#[test]
fn max_connections_refuses_the_excess() {
    let s = setup(r##"["#"]"##, "max_connections = 3\n", &[]);
    // Distinct client ids: the same id would take the older session over instead.
    let connect = |n: u8| {
        [
            0x10u8,
            0x0d,
            0x00,
            0x04,
            b'M',
            b'Q',
            b'T',
            b'T',
            0x04,
            0x02,
            0x00,
            0x3c,
            0x00,
            0x01,
            b'a' + n,
        ]
    };
    let mut held = Vec::new();
    for n in 0..3 {
        let mut t = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
        t.write_all(&connect(n)).expect("CONNECT");
        let mut ack = [0u8; 4];
        t.read_exact(&mut ack).expect("CONNACK");
        held.push(t);
    }
    let mut extra = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    let _ = extra.write_all(&connect(3));
    extra.set_read_timeout(Some(SOON)).expect("timeout");
    let mut buf = Vec::new();
    let _ = extra.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "the fourth connection is closed without a CONNACK, got {buf:?}\n{}",
        s.agent.logs()
    );
    s.agent.wait_for_log("max_connections reached", SOON);
    // A slot frees when a client leaves.
    drop(held.pop());
    wait_until("a free slot to be usable", SOON, || {
        let mut t = TcpStream::connect(("127.0.0.1", s.port)).ok()?;
        t.write_all(&connect(4)).ok()?;
        t.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut ack = [0u8; 4];
        t.read_exact(&mut ack).ok().map(|_| ())
    });
}

/// MQTT 5: a client sending more unacknowledged QoS 1 publishes than the receive
/// maximum the server announced is disconnected with reason 0x93. The commits are held
/// so that nothing is acknowledged meanwhile.
#[test]
fn mqtt5_receive_maximum_is_enforced() {
    use rumqttc::v5::mqttbytes::v5::{Connect, Packet, Publish};
    use rumqttc::v5::mqttbytes::QoS;
    let hold_dir = tempfile::tempdir().expect("tempdir");
    let hold = hold_dir.path().join("hold");
    std::fs::write(&hold, b"").expect("hold");
    let s = setup(
        r##"["#"]"##,
        "receive_maximum = 4\n",
        &[("EDGERELAY_TEST_HOLD_COMMITS", &hold.display().to_string())],
    );
    let mut bytes = bytes::BytesMut::new();
    let connect = Connect {
        keep_alive: 30,
        client_id: "greedy".into(),
        clean_start: true,
        properties: None,
    };
    Packet::Connect(connect, None, None)
        .write(&mut bytes, None)
        .expect("encode");
    for pkid in 1..=5u16 {
        let mut p = Publish::new(
            "greedy/t",
            QoS::AtLeastOnce,
            format!("m{pkid}").into_bytes(),
            None,
        );
        p.pkid = pkid;
        Packet::Publish(p).write(&mut bytes, None).expect("encode");
    }
    let mut t = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    t.write_all(&bytes).expect("write");
    t.set_read_timeout(Some(SOON)).expect("timeout");
    let mut got = Vec::new();
    let _ = t.read_to_end(&mut got);
    eprintln!("raw: {got:02x?}");
    let mut buf = bytes::BytesMut::from(&got[..]);
    let mut packets = Vec::new();
    while !buf.is_empty() {
        packets.push(Packet::read(&mut buf, None).expect("server packets parse"));
    }
    assert!(
        matches!(packets.first(), Some(Packet::ConnAck(_))),
        "{packets:?}"
    );
    assert!(
        !packets.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "nothing acknowledged while commits are held"
    );
    match packets.last() {
        Some(Packet::Disconnect(d)) => assert_eq!(
            d.reason_code,
            rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::ReceiveMaximumExceeded
        ),
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
    std::fs::remove_file(&hold).expect("release");
}
