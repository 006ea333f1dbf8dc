//! Client mode against a real local mosquitto (the broker already on the gateway): the
//! agent acknowledges to it only after commit, so a SIGKILL loses nothing it handed over.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgerelay_tests::*;

const TOTAL: usize = 3000;

#[test]
fn sigkill_in_client_mode_loses_nothing_the_local_broker_handed_over() {
    let local = Mosquitto::start();
    let central = Mosquitto::start();
    let mut sub = Subscriber::start(central.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[local_broker]\nurl = \"{}\"\ntopics = [\"plant/#\"]\nkeep_alive = \"5s\"\n",
        local.url()
    );
    let config = agent_config(&dir.path().join("data"), &central.url(), &extra);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_for_log("subscribed on the local broker", SOON);

    // A device publishing to the gateway's broker at QoS 1, unaware of the agent.
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let port = local.port;
    let publisher = std::thread::spawn(move || {
        let mut opts = rumqttc::MqttOptions::new("device-1", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut conn) = rumqttc::Client::new(opts, 64);
        let pump = std::thread::spawn(move || {
            let mut acked = 0;
            for ev in conn.iter() {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = ev {
                    acked += 1;
                    if acked == TOTAL {
                        break;
                    }
                }
            }
        });
        for i in 0..TOTAL {
            client
                .publish(
                    format!("plant/line-{}", i % 7),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("cm-{i}"),
                )
                .expect("publish");
        }
        pump.join().expect("pump");
        finished.store(true, Ordering::SeqCst);
    });

    // Kill the agent while messages are flowing.
    sub.wait_for("some messages through the agent", SOON, |got| {
        got.len() >= 300
    });
    agent.kill9();
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_for_log("connected to the local broker", SOON);
    publisher.join().expect("publisher");
    assert!(done.load(Ordering::SeqCst));

    sub.wait_for(
        "all messages after the restart",
        Duration::from_secs(60),
        |got| {
            let have: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_slice()).collect();
            (0..TOTAL).all(|i| have.contains(format!("cm-{i}").as_bytes()))
        },
    );
    let dups = sub.received.len() - sub.counts().len();
    eprintln!(
        "{TOTAL} published, {} received upstream ({dups} duplicates after the SIGKILL)",
        sub.received.len()
    );
    // And it stops cleanly in client mode too.
    let status = agent.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", agent.logs());
}
