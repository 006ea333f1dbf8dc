use std::collections::HashSet;

use proptest::prelude::*;

use super::*;

fn policy() -> DictPolicy {
    DictPolicy {
        sample_records: 10,
        sample_bytes: 1 << 20,
        min_samples: 4,
        train_after: Duration::from_secs(60),
        retrain_interval: Duration::from_secs(600),
        baseline_probes: 4,
        probe_every: 1,
        ..DictPolicy::default()
    }
}

fn dict(tag: u8) -> Dictionary {
    Dictionary::new(vec![tag; 64])
}

fn feed(s: &mut DictState, n: usize, now: Instant) {
    let p = b"{\"t\":21.5}".to_vec();
    s.observe(std::iter::repeat_n(p.as_slice(), n), now);
}

/// Train `d` and return its announcement (not yet acknowledged).
fn train_into(s: &mut DictState, d: Dictionary, now: Instant) -> Announcement {
    feed(s, 10, now);
    let job = s.take_training(now).expect("enough samples");
    assert_eq!(job.samples.len(), 10);
    s.trained(Ok(Some(d)));
    s.announcement().expect("announced")
}

#[test]
fn auto_trains_then_uses_the_dictionary_only_after_its_puback() {
    let t0 = Instant::now();
    let mut s = DictState::new(DictMode::Auto, policy(), "up", None);
    assert!(s.announcement().is_none());
    feed(&mut s, 9, t0);
    assert!(s.take_training(t0).is_none(), "9 of 10 samples");
    let d = dict(1);
    let a = train_into(&mut s, d.clone(), t0);
    assert_eq!(a.topic, format!("up/dict/{:016x}", d.id));
    assert_eq!(a.payload.as_ref(), d.bytes.as_slice());
    assert!(s.in_use().is_none(), "not before the PUBACK");
    feed(&mut s, 100, t0);
    assert!(
        s.take_training(t0).is_none(),
        "no second training while one is pending"
    );
    let persisted = s.acked(a.token).expect("adopted");
    assert_eq!(s.in_use().map(|x| x.id), Some(d.id));
    assert_eq!(persisted.current, d);
    assert_eq!(persisted.previous, None);
    assert!(
        s.acked(a.token).is_none(),
        "a duplicate PUBACK changes nothing"
    );
}

#[test]
fn a_few_samples_are_enough_after_train_after() {
    let t0 = Instant::now();
    let mut s = DictState::new(DictMode::Auto, policy(), "up", None);
    feed(&mut s, 3, t0);
    assert!(
        s.take_training(t0 + Duration::from_secs(120)).is_none(),
        "3 < min_samples"
    );
    feed(&mut s, 1, t0);
    assert!(s.take_training(t0 + Duration::from_secs(59)).is_none());
    assert!(s.take_training(t0 + Duration::from_secs(60)).is_some());
}

#[test]
fn a_lost_session_announces_again_in_order() {
    let t0 = Instant::now();
    let mut s = DictState::new(DictMode::Fixed(dict(7)), policy(), "", None);
    let first = s
        .announcement()
        .expect("fixed dictionary announced at start");
    assert_eq!(first.topic, format!("dict/{:016x}", dict(7).id));
    assert!(s.announcement().is_none());
    s.session_lost();
    let again = s.announcement().expect("announced again");
    assert_eq!(again, first);
    assert!(s.in_use().is_none());
    s.acked(again.token).expect("adopted");
    assert_eq!(s.in_use().map(|d| d.id), Some(dict(7).id));
    // A fixed dictionary is never retrained.
    feed(&mut s, 1000, t0);
    assert!(s.take_training(t0 + Duration::from_secs(10_000)).is_none());
}

#[test]
fn a_persisted_dictionary_is_used_at_once_and_republished() {
    let p = Persisted {
        current: dict(3),
        previous: Some(99),
    };
    let mut s = DictState::new(DictMode::Auto, policy(), "up", Some(p.clone()));
    assert_eq!(s.in_use().map(|d| d.id), Some(dict(3).id));
    let a = s.announcement().expect("republished");
    assert!(s.acked(a.token).is_none(), "nothing new to persist");
    // A fixed file that changed since: the new one waits for its PUBACK.
    let s = DictState::new(DictMode::Fixed(dict(4)), policy(), "up", Some(p.clone()));
    assert!(s.in_use().is_none());
    // Off ignores what was persisted.
    let mut s = DictState::new(DictMode::Off, policy(), "up", Some(p));
    assert!(s.in_use().is_none());
    assert!(s.announcement().is_none());
    feed(&mut s, 100, Instant::now());
    assert!(s.take_training(Instant::now()).is_none());
}

#[test]
fn retrains_when_the_dictionary_stops_saving_no_sooner_than_the_interval() {
    let t0 = Instant::now();
    let mut s = DictState::new(DictMode::Auto, policy(), "up", None);
    let a = train_into(&mut s, dict(1), t0);
    s.acked(a.token);
    let id = dict(1).id;
    for _ in 0..4 {
        assert!(s.probe_next());
        s.probed(id, 800, 1000); // saves 20 %: gain 1.25
    }
    for _ in 0..20 {
        s.probed(0, 500, 1000); // another dictionary's probe: ignored
        s.probed(id, 850, 1000); // gain 1.18: still 70 % of the saving
    }
    feed(&mut s, 10, t0 + Duration::from_secs(700));
    assert!(
        s.take_training(t0 + Duration::from_secs(700)).is_none(),
        "a smaller saving is not degraded yet"
    );
    for _ in 0..20 {
        s.probed(id, 990, 1000);
    }
    feed(&mut s, 10, t0 + Duration::from_secs(300));
    assert!(
        s.take_training(t0 + Duration::from_secs(300)).is_none(),
        "degraded, but the last training was 300 s ago"
    );
    let later = t0 + Duration::from_secs(601);
    feed(&mut s, 10, later);
    let job = s.take_training(later).expect("retraining");
    assert_eq!(
        job.current.map(|d| d.id),
        Some(id),
        "the new one must beat it"
    );
}

#[test]
fn probes_one_batch_in_probe_every_and_only_with_auto_and_a_dictionary() {
    let mut p = policy();
    p.probe_every = 4;
    let mut s = DictState::new(DictMode::Auto, p.clone(), "up", None);
    assert!(!s.probe_next(), "no dictionary in use");
    let a = train_into(&mut s, dict(1), Instant::now());
    s.acked(a.token);
    let probes: Vec<bool> = (0..8).map(|_| s.probe_next()).collect();
    assert_eq!(
        probes,
        [true, false, false, false, true, false, false, false]
    );
    let mut fixed = DictState::new(
        DictMode::Fixed(dict(2)),
        p,
        "up",
        Some(Persisted {
            current: dict(2),
            previous: None,
        }),
    );
    assert!(fixed.in_use().is_some());
    assert!(!fixed.probe_next(), "a fixed dictionary is never retrained");
}

#[test]
fn dictionaries_older_than_the_previous_one_are_cleared() {
    let mut now = Instant::now();
    let mut p = policy();
    p.retrain_interval = Duration::ZERO;
    p.degraded_below = 10.0; // every dictionary counts as degraded once probed
    let mut s = DictState::new(DictMode::Auto, p, "up", None);
    let adopt = |s: &mut DictState, d: Dictionary, now: Instant| {
        let a = train_into(s, d.clone(), now);
        let persisted = s.acked(a.token).expect("adopted");
        for _ in 0..4 {
            s.probed(d.id, 900, 1000);
        }
        persisted
    };
    assert_eq!(adopt(&mut s, dict(1), now).previous, None);
    now += Duration::from_secs(1);
    assert_eq!(adopt(&mut s, dict(2), now).previous, Some(dict(1).id));
    assert!(
        s.announcement().is_none(),
        "the previous one stays retained"
    );
    now += Duration::from_secs(1);
    assert_eq!(adopt(&mut s, dict(3), now).previous, Some(dict(2).id));
    let clear = s.announcement().expect("the oldest is cleared");
    assert_eq!(clear.topic, format!("up/dict/{:016x}", dict(1).id));
    assert!(clear.payload.is_empty());
    assert!(s.acked(clear.token).is_none());
}

#[test]
fn failed_or_useless_training_waits_for_the_interval() {
    let t0 = Instant::now();
    let mut s = DictState::new(DictMode::Auto, policy(), "up", None);
    feed(&mut s, 10, t0);
    s.take_training(t0).expect("job");
    s.trained(Err(WireError::Compress("too uniform".into())));
    feed(&mut s, 10, t0 + Duration::from_secs(1));
    assert!(s.take_training(t0 + Duration::from_secs(1)).is_none());
    let later = t0 + Duration::from_secs(600);
    feed(&mut s, 10, later);
    s.take_training(later).expect("tries again");
    s.trained(Ok(None));
    assert!(s.announcement().is_none());
}

#[test]
fn samples_are_bounded_in_bytes() {
    let mut p = policy();
    p.sample_records = 1000;
    p.sample_bytes = 100;
    let mut s = DictState::new(DictMode::Auto, p, "up", None);
    let big = vec![b'x'; 64];
    let now = Instant::now();
    s.observe(std::iter::repeat_n(big.as_slice(), 10), now);
    let job = s.take_training(now).expect("full by bytes");
    assert_eq!(job.samples.iter().map(Vec::len).sum::<usize>(), 100);
}

#[test]
fn persisted_round_trips_and_rejects_garbage() {
    let p = Persisted {
        current: dict(5),
        previous: Some(42),
    };
    assert_eq!(Persisted::decode(&p.encode()), Some(p));
    let none = Persisted {
        current: dict(6),
        previous: None,
    };
    assert_eq!(Persisted::decode(&none.encode()), Some(none));
    assert_eq!(Persisted::decode(b""), None);
    assert_eq!(
        Persisted::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0]),
        None,
        "no dictionary"
    );
    assert_eq!(
        Persisted::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 9]),
        None,
        "unknown version"
    );
}

/// ~190-byte JSON telemetry like the benchmark's.
fn telemetry(i: usize) -> Vec<u8> {
    format!(
        "{{\"device\":\"sensor-{:03}\",\"ts\":{},\"temperature\":{:.2},\"humidity\":{:.1},\"battery\":{},\"status\":\"ok\",\"fw\":\"2.4.{}\",\"rssi\":-{}}}",
        i % 200,
        1_700_000_000_000u64 + i as u64 * 137,
        20.0 + (i % 37) as f64 * 0.13,
        40.0 + (i % 23) as f64 * 0.7,
        100 - i % 50,
        i % 4,
        60 + i % 30
    )
    .into_bytes()
}

#[test]
fn training_keeps_a_dictionary_only_when_it_helps() {
    let samples: Vec<Vec<u8>> = (0..2000).map(telemetry).collect();
    let job = TrainingJob {
        samples,
        current: None,
        max_size: 32 << 10,
        min_gain: 1.05,
    };
    let d = train(&job, 3, 10)
        .expect("trains")
        .expect("helps small batches");
    assert!(d.bytes.len() <= 32 << 10);
    assert!(
        train(&job, 3, 1000).expect("trains").is_none(),
        "a batch of 1,000 is its own context: not worth 32 KiB"
    );
    // Against itself a new dictionary cannot be 5 % better.
    let again = TrainingJob {
        current: Some(Arc::new(d)),
        ..job
    };
    assert!(train(&again, 3, 10).expect("trains").is_none());
    // Random bytes: nothing to learn.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64: incompressible bytes, reproducibly.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    let noise: Vec<Vec<u8>> = (0..2000)
        .map(|_| (0..190).map(|_| next()).collect())
        .collect();
    let noise_job = TrainingJob {
        samples: noise,
        current: None,
        max_size: 32 << 10,
        min_gain: 1.05,
    };
    assert!(!matches!(train(&noise_job, 3, 10), Ok(Some(_))));
}

#[derive(Debug, Clone)]
enum Op {
    Train(u8),
    Announce,
    Ack(usize),
    Lose,
    Measure(u16),
    Wait,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::Train),
        Just(Op::Announce),
        (0usize..8).prop_map(Op::Ack),
        Just(Op::Lose),
        (1u16..5000).prop_map(Op::Measure),
        Just(Op::Wait),
    ]
}

proptest! {
    /// Whatever the order of trainings, announcements, PUBACKs and lost sessions, the
    /// dictionary in use is always one whose announcement the broker acknowledged, and
    /// what is persisted is exactly what is in use.
    #[test]
    fn only_acknowledged_dictionaries_are_used(ops in proptest::collection::vec(op(), 1..80)) {
        let mut p = policy();
        p.retrain_interval = Duration::from_secs(1);
        p.degraded_below = 0.9;
        p.probe_every = 1;
        let mut now = Instant::now();
        let mut s = DictState::new(DictMode::Auto, p, "up", None);
        let mut out: Vec<Announcement> = Vec::new();
        let mut acked_ids: HashSet<u64> = HashSet::new();
        let mut persisted: Option<Persisted> = None;
        for op in ops {
            match op {
                Op::Train(tag) => {
                    feed(&mut s, 10, now);
                    if s.take_training(now).is_some() {
                        s.trained(Ok(Some(dict(tag))));
                    }
                }
                Op::Announce => out.extend(s.announcement()),
                Op::Ack(i) => {
                    if !out.is_empty() {
                        let a = out.remove(i % out.len());
                        if !a.payload.is_empty() {
                            acked_ids.insert(crate::wire::content_id(&a.payload));
                        }
                        if let Some(p) = s.acked(a.token) {
                            persisted = Some(p);
                        }
                    }
                }
                Op::Lose => {
                    out.clear();
                    s.session_lost();
                }
                Op::Measure(w) => {
                    if let Some(id) = s.in_use().map(|d| d.id) {
                        s.probed(id, usize::from(w), 2500);
                    }
                }
                Op::Wait => now += Duration::from_secs(2),
            }
            if let Some(d) = s.in_use() {
                prop_assert!(acked_ids.contains(&d.id));
                prop_assert_eq!(persisted.as_ref().map(|p| p.current.id), Some(d.id));
            }
        }
    }
}
