//! `[[policy]]` tables → `policy::Policies`.
//!
//! Checked here rather than at run time: a policy that could never apply (a degraded
//! high priority, two policies giving one stream different priorities or drain orders,
//! a stream name that is not a single topic level) is a config error with its key.

use toml::Spanned;

use super::raw::RawPolicy;
use super::validate::Ctx;
use crate::policy::{Degrade, Drain, Policies, Policy, Priority};

const PRIORITIES: &[(&str, Priority)] = &[
    ("high", Priority::High),
    ("normal", Priority::Normal),
    ("low", Priority::Low),
];
const DRAINS: &[(&str, Drain)] = &[
    ("oldest-first", Drain::OldestFirst),
    ("newest-first", Drain::NewestFirst),
];

/// Shortest and longest sampling interval accepted.
const SAMPLE_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const SAMPLE_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn parse_degrade(ctx: &mut Ctx<'_>, key: &str, f: &Option<Spanned<String>>) -> Degrade {
    let Some(s) = f else { return Degrade::None };
    let text = s.get_ref().trim();
    match text {
        "none" => Degrade::None,
        "latest" => Degrade::Latest,
        _ => match text.strip_prefix("sample:") {
            Some(iv) => match humantime::parse_duration(iv.trim()) {
                Ok(d) if (SAMPLE_MIN..=SAMPLE_MAX).contains(&d) => Degrade::Sample(d),
                Ok(_) => {
                    ctx.err(
                        key,
                        Some(s.span()),
                        format!("{text:?}: the sampling interval must be between 100ms and 24h"),
                    );
                    Degrade::None
                }
                Err(e) => {
                    ctx.err(
                        key,
                        Some(s.span()),
                        format!("{text:?}: {iv:?} is not a duration like \"10s\" ({e})"),
                    );
                    Degrade::None
                }
            },
            None => {
                ctx.err(
                    key,
                    Some(s.span()),
                    format!("{text:?} is not one of \"none\", \"latest\", \"sample:INTERVAL\" (e.g. \"sample:10s\")"),
                );
                Degrade::None
            }
        },
    }
}

/// A stream name becomes one level of the upstream batch topic and a key in the
/// buffer: letters, digits, '-' and '_'.
fn valid_stream_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(super) fn validate_policies(
    ctx: &mut Ctx<'_>,
    raw: Vec<(String, std::ops::Range<usize>, RawPolicy)>,
) -> Policies {
    let mut list: Vec<Policy> = Vec::with_capacity(raw.len());
    for (key, span, p) in raw {
        if p.topics.is_none() {
            ctx.err(
                format!("{key}.topics"),
                Some(span.clone()),
                "is required: the topic filters this policy applies to, e.g. [\"alarms/#\"]",
            );
            continue;
        }
        let topics = ctx.filters(&format!("{key}.topics"), &p.topics, &[]);
        let priority = ctx.choice(
            &format!("{key}.priority"),
            &p.priority,
            PRIORITIES,
            Priority::Normal,
        );
        let degrade = parse_degrade(ctx, &format!("{key}.degrade"), &p.degrade);
        let drain = ctx.choice(
            &format!("{key}.drain"),
            &p.drain,
            DRAINS,
            Drain::OldestFirst,
        );
        if priority == Priority::High && degrade != Degrade::None {
            ctx.err(
                format!("{key}.degrade"),
                p.degrade.as_ref().map(|s| s.span()),
                "high priority is never degraded; use priority \"normal\" or \"low\" to allow dropping",
            );
        }
        let stream = match &p.stream {
            Some(s) if valid_stream_name(s.get_ref()) => s.get_ref().clone(),
            Some(s) => {
                ctx.err(
                    format!("{key}.stream"),
                    Some(s.span()),
                    format!(
                        "{:?} is not a stream name (1 to 64 letters, digits, '-' or '_')",
                        s.get_ref()
                    ),
                );
                continue;
            }
            // One stream per priority unless named: the common case needs no names.
            None => priority.as_str().to_owned(),
        };
        if let Some(other) = list.iter().find(|o| o.stream == stream) {
            if other.priority != priority || other.drain != drain {
                ctx.err(
                    format!("{key}.stream"),
                    Some(span.clone()),
                    format!(
                        "stream {stream:?} is also used by an earlier policy with priority {:?} and drain {:?}; policies sharing a stream must agree on both (give this one its own `stream`)",
                        other.priority.as_str(),
                        other.drain.as_str()
                    ),
                );
                continue;
            }
        }
        list.push(Policy {
            topics,
            stream,
            priority,
            degrade,
            drain,
        });
    }
    Policies::new(list)
}
