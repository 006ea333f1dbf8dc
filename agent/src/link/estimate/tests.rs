use proptest::prelude::*;

use super::*;

fn sample(conn: u64, segs: u64, retrans: u64) -> Transport {
    Transport {
        source: Source::TcpInfo,
        connection: conn,
        srtt: Duration::from_millis(200),
        rttvar: Duration::from_millis(20),
        rtt_recent: Duration::from_millis(190),
        segs_out: segs,
        retrans,
        delivery_rate: 125_000,
        bytes_acked: 0,
        unacked: 0,
        since_last_ack: Some(Duration::from_millis(10)),
    }
}

#[test]
fn loss_is_retransmitted_over_sent_segments() {
    let mut e = Estimator::new();
    e.connected();
    for i in 0..50u64 {
        e.transport(sample(1, i * 1000, i * 20));
    }
    let q = e.quality();
    assert!((q.loss - 0.02).abs() < 1e-9, "{}", q.loss);
    assert_eq!(q.srtt, Duration::from_millis(200));
    assert_eq!(q.source, Source::TcpInfo);
    assert!(q.up);
}

#[test]
fn a_new_connection_starts_a_new_baseline() {
    let mut e = Estimator::new();
    e.connected();
    e.transport(sample(1, 10_000, 500));
    e.transport(sample(1, 11_000, 510));
    // Reconnected: counters start again near zero; no negative or huge delta.
    e.disconnected(false);
    e.connected();
    e.transport(sample(2, 100, 0));
    e.transport(sample(2, 1100, 10));
    let q = e.quality();
    assert!((q.loss - 0.01).abs() < 1e-9, "{}", q.loss);
}

#[test]
fn outstanding_data_without_acks_is_down() {
    let mut e = Estimator::new();
    e.connected();
    let mut t = sample(1, 100, 0);
    e.transport(t);
    assert!(e.quality().up);
    t.unacked = 5;
    t.since_last_ack = Some(Duration::from_millis(1500));
    e.transport(t);
    assert!(e.quality().up, "1.5 s < max(2 s, 4 × 200 ms)");
    t.since_last_ack = Some(Duration::from_secs(3));
    e.transport(t);
    assert!(!e.quality().up, "stalled");
    t.unacked = 0;
    e.transport(t);
    assert!(e.quality().up, "acknowledged again");
    e.disconnected(true);
    assert!(!e.quality().up);
    assert_eq!(e.quality().resets, 1);
}

#[test]
fn pubacks_arriving_keep_a_link_without_ack_evidence_up() {
    let mut e = Estimator::new();
    e.connected();
    let mut t = sample(1, 100, 0);
    t.unacked = 5;
    t.since_last_ack = Some(Duration::from_secs(3));
    // A long loss recovery: no RTT-yielding ACK for 3 s, but PUBACKs come in.
    for _ in 0..5 {
        e.puback(Duration::from_secs(1), 10_000);
        e.transport(t);
        assert!(e.quality().up, "data gets through: not down");
    }
    // Then nothing at all: down once the PUBACKs stopped too.
    e.transport(t);
    assert!(e.quality().up, "two readings without PUBACK: not yet");
    e.transport(t);
    assert!(!e.quality().up, "stalled");
}

#[test]
fn pubacks_give_app_rtt_and_goodput() {
    let t0 = Instant::now();
    let mut e = Estimator::new();
    e.connected();
    e.tick(t0);
    for _ in 0..10 {
        e.puback(Duration::from_millis(300), 1000);
    }
    e.tick(t0 + Duration::from_secs(1));
    let q = e.quality();
    assert_eq!(q.goodput, 10_000);
    assert!((q.app_rtt.as_secs_f64() - 0.3).abs() < 1e-9);
    assert_eq!(q.source, Source::None);
    assert_eq!(
        q.delivery_rate, 10_000,
        "PUBACKs stand in for the kernel's rate"
    );
}

proptest! {
    /// Whatever the counters do (resets, wraps, reconnections), loss stays in 0..=1 and
    /// the estimator never panics.
    #[test]
    fn loss_is_always_a_fraction(
        samples in prop::collection::vec((0u64..3, 0u64..1_000_000, 0u64..1_000_000, any::<bool>()), 1..100)
    ) {
        let mut e = Estimator::new();
        e.connected();
        for (conn, segs, retrans, drop) in samples {
            if drop { e.disconnected(false); e.connected(); }
            e.transport(sample(conn, segs, retrans));
            let q = e.quality();
            prop_assert!((0.0..=1.0).contains(&q.loss));
        }
    }
}

#[test]
fn delivery_rate_is_the_growth_of_the_delivered_counter() {
    let mut e = Estimator::new();
    e.connected();
    let t0 = Instant::now();
    e.acked_bytes(7, 1_000, t0);
    // Too close to the last reading to time: ignored, the baseline kept.
    e.acked_bytes(7, 90_000, t0 + Duration::from_millis(50));
    e.acked_bytes(7, 126_000, t0 + Duration::from_secs(1));
    assert_eq!(e.quality().delivery_rate, 125_000);
    // The kernel's per-ACK estimate no longer overrides the counter's rate.
    e.transport(Transport {
        delivery_rate: 999,
        ..sample(7, 100, 0)
    });
    assert_eq!(e.quality().delivery_rate, 125_000);
    // A new connection starts a new baseline: no rate from across the two.
    e.acked_bytes(8, 500, t0 + Duration::from_secs(2));
    assert_eq!(e.quality().delivery_rate, 125_000);
    e.acked_bytes(8, 32_500, t0 + Duration::from_secs(3));
    assert_eq!(e.quality().delivery_rate, 32_000);
}
