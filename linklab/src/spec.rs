//! Conditions written as text, for the CLI and for readable tests:
//! `delay=150ms,jitter=10ms,loss=3%,rate=1mbit,queue=64kb,outage=on`.
//!
//! Pure. Unknown keys and bad values are errors naming the key; nothing is guessed.

use std::time::Duration;

use crate::model::Conditions;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("link spec {key:?}: {message}")]
pub struct SpecError {
    pub key: String,
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Apply `spec` on top of `base` (keys not named keep their value).
pub fn parse_onto(base: &Conditions, spec: &str) -> Result<Conditions, SpecError> {
    let mut c = base.clone();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| err(part, "expected key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        match key {
            "delay" => c.delay = duration(key, value)?,
            "jitter" => c.jitter = duration(key, value)?,
            "loss" => c.loss = percent(key, value)?,
            "rate" => {
                c.rate_bps = match value {
                    "none" | "off" | "0" => None,
                    v => Some(bits(key, v)?),
                }
            }
            "queue" => {
                c.queue_bytes = match value {
                    "auto" => None,
                    v => Some(bytes(key, v)?),
                }
            }
            "outage" => {
                c.outage = match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(err(key, "use on or off")),
                }
            }
            _ => {
                return Err(err(
                    key,
                    "unknown key (delay, jitter, loss, rate, queue, outage)",
                ))
            }
        }
    }
    Ok(c)
}

/// Parse `spec` from the defaults (no impairment).
pub fn parse(spec: &str) -> Result<Conditions, SpecError> {
    parse_onto(&Conditions::default(), spec)
}

fn split_unit(v: &str) -> (&str, &str) {
    let i = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    (&v[..i], v[i..].trim())
}

fn number(key: &str, n: &str) -> Result<f64, SpecError> {
    n.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .ok_or_else(|| err(key, format!("{n:?} is not a non-negative number")))
}

fn duration(key: &str, v: &str) -> Result<Duration, SpecError> {
    let (n, unit) = split_unit(v);
    let n = number(key, n)?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        _ => return Err(err(key, format!("{v:?}: use a unit: us, ms or s"))),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn percent(key: &str, v: &str) -> Result<f64, SpecError> {
    let (n, unit) = split_unit(v);
    let n = number(key, n)?;
    let p = match unit {
        "%" => n / 100.0,
        "" => n,
        _ => {
            return Err(err(
                key,
                format!("{v:?}: a fraction (0.03) or a percentage (3%)"),
            ))
        }
    };
    if p > 1.0 {
        return Err(err(key, format!("{v:?} is more than 100 %")));
    }
    Ok(p)
}

fn bits(key: &str, v: &str) -> Result<u64, SpecError> {
    let (n, unit) = split_unit(v);
    let n = number(key, n)?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "bit" | "bps" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(err(key, format!("{v:?}: use bit, kbit, mbit or gbit"))),
    };
    let r = (n * mult).round() as u64;
    if r == 0 {
        return Err(err(key, "a rate must be positive (or none)"));
    }
    Ok(r)
}

fn bytes(key: &str, v: &str) -> Result<usize, SpecError> {
    let (n, unit) = split_unit(v);
    let n = number(key, n)?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "kib" => 1024.0,
        "mb" | "mib" => 1024.0 * 1024.0,
        _ => return Err(err(key, format!("{v:?}: use b, kb or mb"))),
    };
    Ok((n * mult).round() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_spec() {
        let c = parse("delay=150ms, jitter=10ms,loss=3%,rate=1mbit,queue=64kb").expect("valid");
        assert_eq!(c.delay, Duration::from_millis(150));
        assert_eq!(c.jitter, Duration::from_millis(10));
        assert!((c.loss - 0.03).abs() < 1e-12);
        assert_eq!(c.rate_bps, Some(1_000_000));
        assert_eq!(c.queue_bytes, Some(65536));
        assert!(!c.outage);
    }

    #[test]
    fn onto_keeps_what_is_not_named() {
        let base = parse("delay=600ms,rate=256kbit,loss=0.05").expect("valid");
        let c = parse_onto(&base, "outage=on").expect("valid");
        assert!(c.outage);
        assert_eq!(c.rate_bps, Some(256_000));
        let c = parse_onto(&c, "rate=none,outage=off").expect("valid");
        assert_eq!(c.rate_bps, None);
        assert!(!c.outage);
        assert_eq!(
            parse("").expect("empty is no impairment"),
            Conditions::default()
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (spec, key) in [
            ("delay=150", "delay"),
            ("loss=150%", "loss"),
            ("rate=fast", "rate"),
            ("rate=0mbit", "rate"),
            ("bandwidth=1mbit", "bandwidth"),
            ("delay", "delay"),
            ("outage=maybe", "outage"),
            ("jitter=-3ms", "jitter"),
        ] {
            assert_eq!(parse(spec).expect_err(spec).key, key, "{spec}");
        }
    }
}
