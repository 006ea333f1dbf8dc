//! Compression dictionaries end to end: the agent trains one from the traffic, publishes
//! it retained, and never compresses a batch with it before the broker acknowledged it;
//! an `unpack` started afterwards decodes everything thanks to the retained copy; a
//! restarted agent uses the dictionary it kept without training again.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use edgerelay::wire::peek_header;
use edgerelay_tests::*;
use rumqttc::mqttbytes::v4::Packet;

fn config(data: &std::path::Path, url: &str, port: u16) -> String {
    agent_config(
        data,
        url,
        &format!(
            "[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"telemetry\"\nack = true\n"
        ),
    )
    .replace(
        "mode = \"passthrough\"\n",
        "mode = \"batch\"\nbatch_size = 20\nbatch_linger = \"50ms\"\n",
    )
    // A fixed level and no rate adaptation: what is tested here is the dictionary's
    // protocol, and a trained dictionary's worth is judged at the level in use. (With
    // adaptation on, this loopback flood of 20-record batches sometimes left the
    // controller pacing below what arrived for tens of seconds — issue 7, open.)
    .replace(
        "[[socket]]",
        "[compression]\nlevel = 3\n\n[rate]\nadapt = false\n\n[[socket]]",
    )
}

/// ~190-byte JSON telemetry from 200 devices; `tag` marks a record for the assertions.
fn telemetry(i: u32, tag: &str) -> Vec<u8> {
    format!(
        "{{\"device\":\"sensor-{:03}\",\"tag\":\"{tag}-{i}\",\"temperature\":{:.2},\"humidity\":{:.1},\"battery\":{},\"status\":\"ok\",\"fw\":\"2.4.{}\",\"rssi\":-{}}}",
        i % 200,
        20.0 + f64::from(i % 37) * 0.13,
        40.0 + f64::from(i % 23) * 0.7,
        100 - i % 50,
        i % 4,
        60 + i % 30
    )
    .into_bytes()
}

/// Send records `range` tagged `tag` and wait for every ack byte (committed).
fn send(conn: &mut TcpStream, range: std::ops::Range<u32>, tag: &str) {
    for i in range.clone() {
        conn.write_all(&frame(&telemetry(i, tag))).expect("write");
    }
    let mut acks = vec![0u8; range.len()];
    conn.read_exact(&mut acks).expect("acks");
}

/// Dictionary id of a batch (0: none), or None for other messages.
fn batch_dictionary(r: &Received) -> Option<u64> {
    r.topic.contains("/batch/").then(|| {
        peek_header(&r.payload)
            .expect("every batch has a valid header")
            .0
            .dictionary
    })
}

/// Send records in steps of `step` until a batch upstream has a dictionary id for which
/// `wanted` holds.
fn send_until(
    conn: &mut TcpStream,
    sub: &mut Subscriber,
    step: u32,
    tag: &str,
    agent: &Agent,
    wanted: impl Fn(u64) -> bool,
) {
    let mut next = 0;
    let deadline = Instant::now() + SOON;
    loop {
        send(conn, next..next + step, tag);
        next += step;
        sub.drain();
        if sub
            .received
            .iter()
            .any(|r| batch_dictionary(r).is_some_and(&wanted))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no batch with the awaited dictionary after {next} records; agent log:\n{}",
            agent.logs()
        );
    }
}

#[test]
fn a_dictionary_is_announced_first_and_a_later_unpack_decodes_with_it() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = config(&dir.path().join("data"), &broker.url(), port);
    let mut agent = Agent::start(dir.path(), &cfg);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");

    // Enough traffic to sample (2,000 payloads), then until a batch uses the dictionary.
    send_until(&mut conn, &mut sub, 500, "a", &agent, |d| d != 0);
    // Order as delivered: every batch's dictionary was announced before it.
    let mut announced: HashSet<u64> = HashSet::new();
    let mut with_dict = 0;
    for r in &sub.received {
        if let Some(id) = r.topic.strip_prefix("up/dict/") {
            let id = u64::from_str_radix(id, 16).expect("hex id");
            assert_eq!(
                edgerelay::wire::content_id(&r.payload),
                id,
                "id is the content hash"
            );
            announced.insert(id);
        } else if let Some(d) = batch_dictionary(r).filter(|d| *d != 0) {
            assert!(
                announced.contains(&d),
                "batch used dictionary {d:016x} before it was published"
            );
            with_dict += 1;
        }
    }
    assert!(with_dict > 0);
    assert_eq!(announced.len(), 1, "one dictionary trained");
    let id = *announced.iter().next().expect("one");

    // An unpack that starts only now gets the dictionary retained, and decodes the
    // batches that follow (which use it).
    let state_dir = tempfile::tempdir().expect("tempdir");
    let unpack = Unpack::start(&broker.url(), "up", &state_dir.path().join("u.redb"));
    send(&mut conn, 0..400, "late");
    let printed = |lines: &[String], tag: &str, n: u32| {
        let have: HashSet<&str> = lines
            .iter()
            .filter_map(|l| l.split("\\\"tag\\\":\\\"").nth(1))
            .filter_map(|rest| rest.split('\\').next())
            .collect();
        (0..n).all(|i| have.contains(format!("{tag}-{i}").as_str()))
    };
    unpack.wait_for("the 400 later records", SOON, |l| printed(l, "late", 400));
    sub.drain();
    let late_batches: Vec<u64> = sub.received.iter().filter_map(batch_dictionary).collect();
    assert_eq!(
        late_batches.last(),
        Some(&id),
        "the last batches still use it"
    );
    assert!(
        unpack.logs().contains("dictionary received"),
        "unpack got the retained dictionary: {}",
        unpack.logs()
    );

    // A restart uses the kept dictionary at once: no new training.
    assert!(agent.terminate(SOON).success());
    drop(conn);
    let agent = Agent::start(dir.path(), &cfg);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect again");
    send(&mut conn, 0..100, "after-restart");
    unpack.wait_for("records after the restart", SOON, |l| {
        printed(l, "after-restart", 100)
    });
    let logs = agent.logs();
    assert!(
        logs.contains(&format!("{id:016x}"))
            && logs.contains("batches now use this compression dictionary"),
        "{logs}"
    );
    assert!(
        !logs.contains("training a compression dictionary"),
        "{logs}"
    );
}

/// A scripted broker that withholds the PUBACK of the dictionary: the agent must go on
/// sending batches without it, and use it only once the PUBACK came.
#[test]
fn no_batch_uses_a_dictionary_before_its_puback() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let broker_port = listener.local_addr().expect("addr").port();
    let (events_tx, events) = mpsc::channel::<String>();
    std::thread::spawn(move || scripted_broker(listener, events_tx));

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // The scripted broker speaks MQTT 3.1.1 (its codec); what is tested is the
    // dictionary's ordering, the same in both protocols.
    let cfg = config(
        &dir.path().join("data"),
        &format!("mqtt://127.0.0.1:{broker_port}"),
        port,
    )
    .replace(
        "mode = \"batch\"\n",
        "mode = \"batch\"\nprotocol = \"3.1.1\"\n",
    );
    assert!(cfg.contains("protocol = \"3.1.1\""), "{cfg}");
    let _agent = Agent::start(dir.path(), &cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let feeding = stop.clone();
    let feeder = std::thread::spawn(move || {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut i = 0;
        while !feeding.load(Ordering::Relaxed) {
            send(&mut conn, i..i + 100, "f");
            i += 100;
        }
    });
    let outcome = events
        .recv_timeout(Duration::from_secs(90))
        .expect("the scripted broker reports");
    stop.store(true, Ordering::Relaxed);
    feeder.join().expect("feeder");
    assert_eq!(outcome, "ok", "{outcome}");
}

/// Acks batches at once and the dictionary only after 30 more batches came without it;
/// reports "ok" once a batch used the acknowledged dictionary, or what went wrong.
fn scripted_broker(listener: TcpListener, report: mpsc::Sender<String>) {
    let (mut s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = BytesMut::new();
    let mut held: Option<(u16, u64)> = None;
    let mut acked: HashSet<u64> = HashSet::new();
    let mut batches_while_held = 0;
    let mut chunk = [0u8; 64 << 10];
    loop {
        let packet = match Packet::read(&mut buf, 16 << 20) {
            Ok(p) => p,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => {
                        let _ = report.send("the agent closed the connection".into());
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            }
            Err(e) => {
                let _ = report.send(format!("bad packet from the agent: {e}"));
                return;
            }
        };
        let reply: Vec<u8> = match packet {
            Packet::Connect(_) => vec![0x20, 0x02, 0x00, 0x00],
            Packet::PingReq => vec![0xd0, 0x00],
            Packet::Publish(p) if p.topic.contains("/dict/") => {
                let id = edgerelay::wire::content_id(&p.payload);
                held = Some((p.pkid, id));
                Vec::new()
            }
            Packet::Publish(p) => {
                let d = match peek_header(&p.payload) {
                    Ok((h, _)) => h.dictionary,
                    Err(e) => {
                        let _ = report.send(format!("undecodable batch: {e}"));
                        return;
                    }
                };
                if d != 0 && !acked.contains(&d) {
                    let _ =
                        report.send(format!("batch used dictionary {d:016x} before its PUBACK"));
                    return;
                }
                if d != 0 {
                    let _ = report.send("ok".into());
                    return;
                }
                if held.is_some() {
                    batches_while_held += 1;
                }
                let mut ack = vec![0x40, 0x02];
                ack.extend_from_slice(&p.pkid.to_be_bytes());
                ack
            }
            _ => Vec::new(),
        };
        if !reply.is_empty() && s.write_all(&reply).is_err() {
            let _ = report.send("write failed".into());
            return;
        }
        if batches_while_held >= 30 {
            if let Some((pkid, id)) = held.take() {
                acked.insert(id);
                let mut ack = vec![0x40, 0x02];
                ack.extend_from_slice(&pkid.to_be_bytes());
                if s.write_all(&ack).is_err() {
                    let _ = report.send("write failed".into());
                    return;
                }
            }
        }
    }
}

/// `dictionary = PATH`: the file is published under its content id and, once
/// acknowledged, every batch uses it and decodes with it; a missing or oversized file
/// stops start-up with the path and the reason.
#[test]
fn a_fixed_dictionary_file_is_announced_and_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let samples: Vec<Vec<u8>> = (0..1000).map(|i| telemetry(i, "s")).collect();
    let refs: Vec<&[u8]> = samples.iter().map(Vec::as_slice).collect();
    let dict = edgerelay::wire::train_dictionary(&refs, 16 << 10).expect("train");
    let dict_path = dir.path().join("fleet.dict");
    std::fs::write(&dict_path, &dict.bytes).expect("write dictionary");

    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let port = free_port();
    let cfg = config(&dir.path().join("data"), &broker.url(), port).replace(
        "[compression]\n",
        &format!("[compression]\ndictionary = \"{}\"\n", dict_path.display()),
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let topic = format!("up/dict/{:016x}", dict.id);
    send_until(&mut conn, &mut sub, 100, "fixed", &agent, |d| d == dict.id);
    let announced = sub
        .received
        .iter()
        .position(|r| r.topic == topic)
        .expect("the dictionary was published under its id");
    assert_eq!(sub.received[announced].payload, dict.bytes);
    let lookup = |id: u64| (id == dict.id).then(|| dict.clone());
    for r in sub.received.iter().filter(|r| r.topic.contains("/batch/")) {
        edgerelay::wire::decode(&r.payload, &lookup).expect("every batch decodes with it");
    }

    for (content, why) in [
        (None, "No such file"),
        (Some(vec![7u8; (1 << 20) + 1]), "the limit is"),
        (Some(Vec::new()), "is empty"),
    ] {
        let bad = dir.path().join("bad.dict");
        let _ = std::fs::remove_file(&bad);
        if let Some(c) = content {
            std::fs::write(&bad, c).expect("write");
        }
        let bad_dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(&bad_dir.path().join("data"), &broker.url(), free_port()).replace(
            "[compression]\n",
            &format!("[compression]\ndictionary = \"{}\"\n", bad.display()),
        );
        let mut agent = Agent::spawn(bad_dir.path(), &cfg);
        let status = agent.wait_exit(SOON);
        assert!(!status.success());
        let logs = agent.logs();
        assert!(
            logs.contains(&bad.display().to_string()) && logs.contains(why),
            "{why}: {logs}"
        );
    }
}
