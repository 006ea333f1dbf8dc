//! Which zstd dictionary batches are compressed with, and when to train a new one.
//!
//! Why: telemetry payloads repeat their keys and shapes; a dictionary trained on recent
//! payloads lets small batches compress like big ones. The central side can only decode
//! a batch whose dictionary it has, so a dictionary is first published (retained, QoS 1,
//! at `{topic_prefix}/dict/{id}`) and used only once the broker acknowledged it.
//!
//! Pure: time is passed in and training itself (`train`) runs wherever the caller puts
//! it (the batch packer uses a thread), so this is unit-testable without a broker.
//!
//! Invariants:
//! - `in_use` is only ever a dictionary the broker acknowledged: in this run, or in an
//!   earlier one (it is persisted only after its PUBACK).
//! - An announcement whose PUBACK was lost with its session is announced again.
//! - Samples are bounded in count and bytes; at most one training runs at a time and
//!   trainings start at least `retrain_interval` apart.
//! - A trained dictionary is adopted only when it beats, on held-out samples, both no
//!   dictionary and the one in use: a useless 32 KiB upload is never made.
//! - Of the dictionaries this gateway published, the one in use and the one before stay
//!   retained (batches still queued for a subscriber may need it); older ones are
//!   cleared with an empty retained message.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::forward::{upstream_topic, Announcement};
use crate::wire::{Dictionary, WireError};

/// How dictionaries are trained and when.
#[derive(Debug, Clone)]
pub struct DictPolicy {
    /// Largest dictionary trained.
    pub max_size: usize,
    /// Training starts once this many payloads were sampled...
    pub sample_records: usize,
    /// ...or this many bytes of them...
    pub sample_bytes: usize,
    /// ...or, with at least `min_samples`, once sampling has run for `train_after`.
    pub min_samples: usize,
    pub train_after: Duration,
    /// Least time between two trainings.
    pub retrain_interval: Duration,
    /// One batch in this many made with the dictionary is also compressed without it,
    /// measuring what the dictionary still saves.
    pub probe_every: u32,
    /// Probes whose saving makes the baseline after adoption.
    pub baseline_probes: u32,
    /// Retrain when the dictionary saves less than this fraction of what it saved just
    /// after adoption (the traffic has drifted away from it).
    pub degraded_below: f64,
    /// A new dictionary must make held-out samples this much smaller than the best of
    /// no dictionary and the current one.
    pub min_gain: f64,
}

impl Default for DictPolicy {
    fn default() -> Self {
        Self {
            max_size: 32 << 10,
            sample_records: 2000,
            sample_bytes: 1 << 20,
            min_samples: 64,
            train_after: Duration::from_secs(300),
            retrain_interval: Duration::from_secs(1800),
            probe_every: 16,
            baseline_probes: 4,
            degraded_below: 0.5,
            min_gain: 1.05,
        }
    }
}

/// Where dictionaries come from.
#[derive(Debug, Clone)]
pub enum DictMode {
    Off,
    Auto,
    Fixed(Dictionary),
}

/// What is kept in the store so a restart neither retrains nor forgets what to clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persisted {
    pub current: Dictionary,
    pub previous: Option<u64>,
}

impl Persisted {
    /// Meta key under which the store keeps it.
    pub const KEY: &'static str = "uplink.dictionary";
    const VERSION: u8 = 1;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.current.bytes.len());
        out.push(Self::VERSION);
        out.extend_from_slice(&self.previous.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.current.bytes);
        out
    }

    /// `None` for anything this version did not write (then the agent trains afresh).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != Self::VERSION || rest.len() <= 8 {
            return None;
        }
        let (prev, dict) = rest.split_at(8);
        let prev = u64::from_le_bytes(prev.try_into().ok()?);
        Some(Self {
            current: Dictionary::new(dict.to_vec()),
            previous: (prev != 0).then_some(prev),
        })
    }
}

/// What an announcement's PUBACK means.
#[derive(Debug, Clone)]
enum Job {
    /// Publish `dict`; `adopt`: start using it once acknowledged (else it is already in
    /// use and this republishes it, in case the broker lost its retained messages).
    Publish { dict: Arc<Dictionary>, adopt: bool },
    /// Clear the retained dictionary with this id.
    Clear(u64),
}

/// Samples to train on, and the dictionary a new one must beat.
#[derive(Debug)]
pub struct TrainingJob {
    pub samples: Vec<Vec<u8>>,
    pub current: Option<Arc<Dictionary>>,
    pub max_size: usize,
    pub min_gain: f64,
}

#[derive(Debug)]
struct Sampler {
    samples: Vec<Vec<u8>>,
    bytes: usize,
    since: Instant,
}

/// What the dictionary in use saves: compressed size without it / with it, on the same
/// batch bodies (probes), smoothed; compared with its value just after adoption.
#[derive(Debug, Default)]
struct Gain {
    baseline_sum: f64,
    baseline_n: u32,
    baseline: Option<f64>,
    ewma: f64,
}

impl Gain {
    fn observe(&mut self, gain: f64, baseline_probes: u32) {
        match self.baseline {
            Some(_) => self.ewma += (gain - self.ewma) / 4.0,
            None => {
                self.baseline_sum += gain;
                self.baseline_n += 1;
                if self.baseline_n >= baseline_probes.max(1) {
                    let b = self.baseline_sum / f64::from(self.baseline_n);
                    self.baseline = Some(b);
                    self.ewma = b;
                }
            }
        }
    }

    /// The saving (gain − 1) fell below `below` × the saving at adoption.
    fn degraded(&self, below: f64) -> bool {
        self.baseline
            .is_some_and(|b| self.ewma - 1.0 < (b - 1.0) * below)
    }
}

/// The dictionary state of one uplink.
#[derive(Debug)]
pub struct DictState {
    mode: DictMode,
    policy: DictPolicy,
    prefix: String,
    in_use: Option<Arc<Dictionary>>,
    previous: Option<u64>,
    queued: VecDeque<(u64, Job)>,
    sent: HashMap<u64, Job>,
    next_token: u64,
    sampler: Option<Sampler>,
    training: bool,
    last_training: Option<Instant>,
    gain: Gain,
    /// Batches made with the dictionary in use (for `probe_every`).
    batches: u64,
}

impl DictState {
    /// `persisted`: what an earlier run adopted (already acknowledged by the broker).
    pub fn new(
        mode: DictMode,
        policy: DictPolicy,
        prefix: &str,
        persisted: Option<Persisted>,
    ) -> Self {
        let mut s = Self {
            mode,
            policy,
            prefix: prefix.to_owned(),
            in_use: None,
            previous: None,
            queued: VecDeque::new(),
            sent: HashMap::new(),
            next_token: 1,
            sampler: None,
            training: false,
            last_training: None,
            gain: Gain::default(),
            batches: 0,
        };
        let persisted = persisted.filter(|p| match &s.mode {
            DictMode::Off => false,
            DictMode::Auto => true,
            DictMode::Fixed(d) => d.id == p.current.id,
        });
        match (persisted, s.mode.clone()) {
            (Some(p), _) => {
                let d = Arc::new(p.current);
                tracing::info!(dictionary = %format_args!("{:016x}", d.id), "batches now use this compression dictionary (kept from the last run)");
                s.previous = p.previous;
                s.in_use = Some(d.clone());
                s.queue(Job::Publish {
                    dict: d,
                    adopt: false,
                });
            }
            (None, DictMode::Fixed(d)) => s.queue(Job::Publish {
                dict: Arc::new(d),
                adopt: true,
            }),
            (None, _) => {}
        }
        s
    }

    fn queue(&mut self, job: Job) {
        self.queued.push_back((self.next_token, job));
        self.next_token += 1;
    }

    /// The dictionary batches are compressed with now.
    pub fn in_use(&self) -> Option<&Arc<Dictionary>> {
        self.in_use.as_ref()
    }

    /// The next control publish to send (QoS 1, retained).
    pub fn announcement(&mut self) -> Option<Announcement> {
        let (token, job) = self.queued.pop_front()?;
        let (id, payload) = match &job {
            Job::Publish { dict, .. } => (dict.id, Bytes::from(dict.bytes.clone())),
            Job::Clear(id) => (*id, Bytes::new()),
        };
        self.sent.insert(token, job);
        Some(Announcement {
            token,
            topic: upstream_topic(&self.prefix, &format!("dict/{id:016x}")),
            payload,
        })
    }

    /// The broker acknowledged announcement `token`. Returns what to persist when a
    /// dictionary was adopted.
    pub fn acked(&mut self, token: u64) -> Option<Persisted> {
        let Job::Publish { dict, adopt: true } = self.sent.remove(&token)? else {
            return None;
        };
        if self.in_use.as_ref().is_some_and(|d| d.id == dict.id) {
            return None;
        }
        tracing::info!(dictionary = %format_args!("{:016x}", dict.id), "batches now use this compression dictionary");
        let old = self.in_use.replace(dict.clone()).map(|d| d.id);
        if let Some(stale) = self.previous.filter(|p| Some(*p) != old && *p != dict.id) {
            self.queue(Job::Clear(stale));
        }
        self.previous = old;
        self.gain = Gain::default();
        self.batches = 0;
        Some(Persisted {
            current: (*dict).clone(),
            previous: self.previous,
        })
    }

    /// The session ended: announcements not acknowledged go out again on the next one.
    pub fn session_lost(&mut self) {
        let mut unacked: Vec<(u64, Job)> = self.sent.drain().collect();
        unacked.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        for entry in unacked {
            self.queued.push_front(entry);
        }
    }

    /// A candidate is being trained or waits for its PUBACK.
    fn candidate_pending(&self) -> bool {
        let adopting = |j: &Job| matches!(j, Job::Publish { adopt: true, .. });
        self.training
            || self.queued.iter().any(|(_, j)| adopting(j))
            || self.sent.values().any(adopting)
    }

    /// Payloads about to be sent: sampled while a dictionary is wanted.
    pub fn observe<'a>(&mut self, payloads: impl Iterator<Item = &'a [u8]>, now: Instant) {
        if self.sampler.is_none() && self.wants_training(now) {
            self.sampler = Some(Sampler {
                samples: Vec::new(),
                bytes: 0,
                since: now,
            });
        }
        let Some(s) = self.sampler.as_mut() else {
            return;
        };
        for p in payloads {
            if s.samples.len() >= self.policy.sample_records || s.bytes >= self.policy.sample_bytes
            {
                break;
            }
            if p.is_empty() {
                continue;
            }
            let p = &p[..p.len().min(self.policy.sample_bytes - s.bytes)];
            s.bytes += p.len();
            s.samples.push(p.to_vec());
        }
    }

    fn wants_training(&self, now: Instant) -> bool {
        let due = self
            .last_training
            .is_none_or(|t| now.saturating_duration_since(t) >= self.policy.retrain_interval);
        matches!(self.mode, DictMode::Auto)
            && due
            && !self.candidate_pending()
            && (self.in_use.is_none() || self.gain.degraded(self.policy.degraded_below))
    }

    /// Samples to train on, once there are enough.
    pub fn take_training(&mut self, now: Instant) -> Option<TrainingJob> {
        let s = self.sampler.as_ref()?;
        let full =
            s.samples.len() >= self.policy.sample_records || s.bytes >= self.policy.sample_bytes;
        let long_enough = s.samples.len() >= self.policy.min_samples
            && now.saturating_duration_since(s.since) >= self.policy.train_after;
        if !full && !long_enough {
            return None;
        }
        let s = self.sampler.take()?;
        self.training = true;
        self.last_training = Some(now);
        Some(TrainingJob {
            samples: s.samples,
            current: self.in_use.clone(),
            max_size: self.policy.max_size,
            min_gain: self.policy.min_gain,
        })
    }

    /// The outcome of a training: a dictionary worth announcing, none worth it, or an
    /// error (too few or too uniform samples). Either way the next try waits
    /// `retrain_interval`.
    pub fn trained(&mut self, outcome: Result<Option<Dictionary>, WireError>) {
        self.training = false;
        match outcome {
            Ok(Some(d)) => {
                tracing::info!(id = %format_args!("{:016x}", d.id), bytes = d.bytes.len(), "trained a compression dictionary; announcing it");
                self.queue(Job::Publish {
                    dict: Arc::new(d),
                    adopt: true,
                });
            }
            Ok(None) => tracing::info!(
                "a trained dictionary would not make batches smaller; keeping the current setting"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "dictionary training failed; will try again later")
            }
        }
    }

    /// Whether the next batch should also be compressed without the dictionary (a
    /// probe of what the dictionary saves). Call once per batch.
    pub fn probe_next(&mut self) -> bool {
        if self.in_use.is_none() || !matches!(self.mode, DictMode::Auto) {
            return false;
        }
        self.batches += 1;
        (self.batches - 1).is_multiple_of(u64::from(self.policy.probe_every.max(1)))
    }

    /// A probe: a batch body compressed with dictionary `dictionary` to `with` bytes,
    /// and without it to `without` bytes.
    pub fn probed(&mut self, dictionary: u64, with: usize, without: usize) {
        if with == 0 || self.in_use.as_ref().is_none_or(|d| d.id != dictionary) {
            return;
        }
        self.gain
            .observe(without as f64 / with as f64, self.policy.baseline_probes);
    }
}

/// Train a dictionary from `job` and keep it only if it would make batches of
/// `batch_records` records, at zstd `level`, at least `min_gain` times smaller than both
/// no dictionary and the current one — judged on held-out samples.
///
/// A dictionary saves a roughly fixed number of bytes per batch (the context a batch
/// would otherwise have to build up), so with fewer held-out samples than a batch holds
/// the saving is measured per group and set against the size of a whole batch;
/// extrapolating that size from smaller groups overestimates it, which errs towards
/// sending no dictionary.
pub fn train(
    job: &TrainingJob,
    level: i32,
    batch_records: usize,
) -> Result<Option<Dictionary>, WireError> {
    // The newest fifth is held out: it is closest to what comes next.
    let split = job.samples.len() - job.samples.len() / 5;
    let (train_set, held_out) = job.samples.split_at(split);
    if held_out.is_empty() {
        return Err(WireError::Compress(
            "too few samples to train a dictionary".into(),
        ));
    }
    let refs: Vec<&[u8]> = train_set.iter().map(Vec::as_slice).collect();
    let candidate = crate::wire::train_dictionary(&refs, job.max_size)?;
    let group = batch_records.clamp(1, held_out.len());
    let groups = held_out.len().div_ceil(group) as f64;
    let plain = compressed_size(held_out, level, None, group)?;
    let with_candidate = compressed_size(held_out, level, Some(&candidate), group)?;
    let best_now = match &job.current {
        Some(d) => plain.min(compressed_size(held_out, level, Some(d), group)?),
        None => plain,
    } as f64;
    let saved_per_batch = (best_now - with_candidate as f64) / groups;
    let batch_size = best_now / held_out.len() as f64 * batch_records.max(1) as f64;
    let needed = batch_size * (1.0 - 1.0 / job.min_gain);
    Ok((saved_per_batch > 0.0 && saved_per_batch >= needed).then_some(candidate))
}

fn compressed_size(
    samples: &[Vec<u8>],
    level: i32,
    dict: Option<&Dictionary>,
    group: usize,
) -> Result<usize, WireError> {
    let err = |e: std::io::Error| WireError::Compress(e.to_string());
    let mut c = match dict {
        Some(d) => zstd::bulk::Compressor::with_dictionary(level, &d.bytes).map_err(err)?,
        None => zstd::bulk::Compressor::new(level).map_err(err)?,
    };
    let mut total = 0;
    for chunk in samples.chunks(group.max(1)) {
        total += c.compress(&chunk.concat()).map_err(err)?.len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests;
