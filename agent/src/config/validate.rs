//! Raw TOML → typed `Config`, collecting every problem instead of stopping at the first.
//!
//! Each section is deserialised on its own (a structural error in one section does not
//! hide problems in another) and every leaf value is checked with its key and line.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::raw::{
    Field, RawAgent, RawBuffer, RawCompression, RawLink, RawLocalBroker, RawLocalMqtt, RawLog,
    RawMetrics, RawPolicy, RawRate, RawSocket, RawUpstream, SizeValue,
};
use super::*;

pub(super) struct Ctx<'a> {
    text: &'a str,
    pub(super) problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    pub(super) fn err(
        &mut self,
        key: impl Into<String>,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) {
        let line = span.map(|s| self.line(s.start));
        self.problems.push(Problem {
            key: key.into(),
            line,
            message: message.into(),
        });
    }

    fn section<T: DeserializeOwned>(
        &mut self,
        key: &str,
        value: Spanned<DeValue<'_>>,
    ) -> Option<T> {
        let span = value.span();
        match T::deserialize(ValueDeserializer::from(value)) {
            Ok(t) => Some(t),
            Err(e) => {
                let msg = e.message().trim().to_owned();
                // Name the offending key itself when serde tells us which one it is.
                let full_key = msg
                    .strip_prefix("unknown field `")
                    .and_then(|rest| rest.split_once('`'))
                    .map_or_else(|| key.to_owned(), |(field, _)| format!("{key}.{field}"));
                self.err(full_key, e.span().or(Some(span)), msg);
                None
            }
        }
    }

    pub(super) fn required(
        &mut self,
        key: &str,
        f: &Field<String>,
        section_span: Option<Range<usize>>,
    ) -> Option<String> {
        match f {
            Some(s) if !s.get_ref().trim().is_empty() => Some(s.get_ref().clone()),
            Some(s) => {
                self.err(key, Some(s.span()), "must not be empty");
                None
            }
            None => {
                self.err(key, section_span, "is required");
                None
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        key: &str,
        f: &Field<String>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(s) = f else { return default };
        match humantime::parse_duration(s.get_ref().trim()) {
            Ok(d) if d < min || d > max => {
                self.err(
                    key,
                    Some(s.span()),
                    format!(
                        "{:?} is out of range ({} to {})",
                        s.get_ref(),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    key,
                    Some(s.span()),
                    format!(
                        "{:?} is not a duration like \"500ms\", \"30s\" or \"2h\" ({e})",
                        s.get_ref()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn size(
        &mut self,
        key: &str,
        f: &Field<SizeValue>,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        let Some(s) = f else { return default };
        let parsed = match s.get_ref() {
            SizeValue::Bytes(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            SizeValue::Text(t) => t
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|_| format!("{t:?} is not a size like \"64KiB\", \"512MiB\" or \"2GiB\"")),
        };
        match parsed {
            Ok(n) if n < min || n > max => {
                self.err(
                    key,
                    Some(s.span()),
                    format!(
                        "{} is out of range ({} to {})",
                        super::render::size(n),
                        super::render::size(min),
                        super::render::size(max)
                    ),
                );
                default
            }
            Ok(n) => n,
            Err(m) => {
                self.err(key, Some(s.span()), m);
                default
            }
        }
    }

    pub(super) fn int(
        &mut self,
        key: &str,
        f: &Field<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        let Some(v) = f else { return default };
        let n = *v.get_ref();
        if n < min || n > max {
            self.err(
                key,
                Some(v.span()),
                format!("{n} is out of range ({min} to {max})"),
            );
            return default;
        }
        n
    }

    /// username + (password | password_file) of a client section.
    pub(super) fn credentials(
        &mut self,
        section: &str,
        username: &Field<String>,
        password: &Field<String>,
        password_file: &Field<String>,
    ) -> (Option<String>, Option<Secret>) {
        let user = username.as_ref().map(|s| s.get_ref().clone());
        let secret = match (password, password_file) {
            (Some(p), Some(_)) => {
                self.err(
                    format!("{section}.password"),
                    Some(p.span()),
                    "set either password or password_file, not both",
                );
                None
            }
            (Some(p), None) => Some(Secret::new(p.get_ref().clone())),
            (None, Some(f)) => match std::fs::read_to_string(f.get_ref()) {
                Ok(s) => Some(Secret::new(s.trim_end_matches(['\r', '\n']).to_owned())),
                Err(e) => {
                    self.err(
                        format!("{section}.password_file"),
                        Some(f.span()),
                        format!("cannot read {:?}: {e}", f.get_ref()),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        if secret.is_some() && user.is_none() {
            let s = password
                .as_ref()
                .or(password_file.as_ref())
                .map(|s| s.span());
            self.err(
                format!("{section}.username"),
                s,
                "a password needs a username",
            );
        }
        (user, secret)
    }

    /// A required `mqtt://host[:port]` URL: (the URL, (host, port)).
    pub(super) fn mqtt_url(
        &mut self,
        key: &str,
        f: &Field<String>,
        section_span: Option<Range<usize>>,
    ) -> Option<(String, (String, u16))> {
        self.url_with(key, f, section_span, parse_url)
    }

    /// A required `mqtt://` or `mqtts://` URL: (the URL, (host, port, TLS)).
    pub(super) fn url_with<T>(
        &mut self,
        key: &str,
        f: &Field<String>,
        section_span: Option<Range<usize>>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Option<(String, T)> {
        let url = self.required(key, f, section_span)?;
        match parse(&url) {
            Ok(hp) => Some((url, hp)),
            Err(m) => {
                self.err(key, f.as_ref().map(|s| s.span()), m);
                None
            }
        }
    }

    /// A list of MQTT topic filters.
    pub(super) fn filters(
        &mut self,
        key: &str,
        f: &Field<Vec<String>>,
        default: &[&str],
    ) -> Vec<String> {
        let Some(list) = f else {
            return default.iter().map(|s| (*s).to_owned()).collect();
        };
        if list.get_ref().is_empty() {
            self.err(
                key,
                Some(list.span()),
                "must list at least one topic filter",
            );
        }
        for filter in list.get_ref() {
            if let Err(m) = crate::topic::check_filter(filter) {
                self.err(key, Some(list.span()), format!("{filter:?}: {m}"));
            }
        }
        list.get_ref().clone()
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        key: &str,
        f: &Field<String>,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(s) = f else { return default };
        if let Some((_, v)) = options
            .iter()
            .find(|(name, _)| *name == s.get_ref().as_str())
        {
            return *v;
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        self.err(
            key,
            Some(s.span()),
            format!("{:?} is not one of {}", s.get_ref(), names.join(", ")),
        );
        default
    }
}

pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<Problem>> {
    let mut ctx = Ctx {
        text,
        problems: Vec::new(),
    };
    let (doc, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        for e in errors {
            ctx.err("(syntax)", e.span(), e.message().trim().to_owned());
        }
        return Err(ctx.problems);
    }
    let mut agent = None;
    let mut buffer = None;
    let mut sockets = Vec::new();
    let mut policies = Vec::new();
    let mut upstream = None;
    let mut local_mqtt = None;
    let mut compression = None;
    let mut link = None;
    let mut rate = None;
    let mut local_broker = None;
    let mut metrics = None;
    let mut log = None;
    let mut spans: std::collections::HashMap<&'static str, Range<usize>> = Default::default();
    for (k, v) in doc.into_inner() {
        let name = k.get_ref().as_ref().to_owned();
        let span = v.span();
        match name.as_str() {
            "agent" => {
                spans.insert("agent", span);
                agent = ctx.section::<RawAgent>("agent", v);
            }
            "buffer" => buffer = ctx.section::<RawBuffer>("buffer", v),
            "compression" => compression = ctx.section::<RawCompression>("compression", v),
            "link" => link = ctx.section::<RawLink>("link", v),
            "rate" => rate = ctx.section::<RawRate>("rate", v),
            "metrics" => metrics = ctx.section::<RawMetrics>("metrics", v),
            "log" => log = ctx.section::<RawLog>("log", v),
            "local_mqtt" => local_mqtt = ctx.section::<RawLocalMqtt>("local_mqtt", v),
            "local_broker" => {
                spans.insert("local_broker", span);
                local_broker = ctx.section::<RawLocalBroker>("local_broker", v);
            }
            "upstream" => {
                spans.insert("upstream", span);
                upstream = ctx.section::<RawUpstream>("upstream", v);
            }
            "socket" => match v.into_inner() {
                DeValue::Array(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let key = format!("socket[{i}]");
                        let item_span = item.span();
                        if let Some(raw) = ctx.section::<RawSocket>(&key, item) {
                            sockets.push((key, item_span, raw));
                        }
                    }
                }
                _ => ctx.err(
                    "socket",
                    Some(span),
                    "must be an array of tables: write [[socket]]",
                ),
            },
            "policy" => match v.into_inner() {
                DeValue::Array(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let key = format!("policy[{i}]");
                        let item_span = item.span();
                        if let Some(raw) = ctx.section::<RawPolicy>(&key, item) {
                            policies.push((key, item_span, raw));
                        }
                    }
                }
                _ => ctx.err(
                    "policy",
                    Some(span),
                    "must be an array of tables: write [[policy]]",
                ),
            },
            other => ctx.err(other, Some(k.span()), "unknown section"),
        }
    }
    let agent = sections::validate_agent(&mut ctx, agent, spans.get("agent").cloned(), path);
    let buffer = sections::validate_buffer(&mut ctx, buffer.unwrap_or_default());
    let sockets: Vec<SocketConfig> = sockets
        .into_iter()
        .filter_map(|(key, span, raw)| sections::validate_socket(&mut ctx, &key, span, raw, path))
        .collect();
    sections::check_duplicate_listens(&mut ctx, &sockets);
    let upstream = match upstream {
        Some(raw) => sections::validate_upstream(
            &mut ctx,
            raw,
            spans.get("upstream").cloned(),
            agent.as_ref(),
            path,
        ),
        None => {
            if !spans.contains_key("upstream") {
                ctx.err("upstream", None, "section [upstream] is required");
            }
            None
        }
    };
    let gateway = agent
        .as_ref()
        .map_or("gateway", |a| a.gateway_id.as_str())
        .to_owned();
    let local_mqtt =
        local_mqtt.and_then(|raw| super::local::validate_local_mqtt(&mut ctx, raw, &buffer, path));
    let local_broker = local_broker.and_then(|raw| {
        super::local::validate_local_broker(
            &mut ctx,
            raw,
            spans.get("local_broker").cloned(),
            &gateway,
        )
    });
    let compression =
        sections::validate_compression(&mut ctx, compression.unwrap_or_default(), path);
    let link = sections::validate_link(&mut ctx, link.unwrap_or_default());
    let rate = sections::validate_rate(&mut ctx, rate.unwrap_or_default());
    let policies = super::policy::validate_policies(&mut ctx, policies);
    let metrics = super::ops::validate_metrics(&mut ctx, metrics.unwrap_or_default());
    let log = super::ops::validate_log(&mut ctx, log.unwrap_or_default());
    match (agent, upstream) {
        (Some(agent), Some(upstream)) if ctx.problems.is_empty() => Ok(Config {
            agent,
            compression,
            link,
            rate,
            policies,
            buffer,
            sockets,
            local_mqtt,
            local_broker,
            upstream,
            metrics,
            log,
        }),
        _ => Err(ctx.problems),
    }
}

pub(super) fn resolve(path: &Path, config_path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    config_path.parent().unwrap_or(Path::new(".")).join(path)
}

/// A plain `mqtt://` URL (where TLS is not offered): host and port.
pub(super) fn parse_url(url: &str) -> Result<(String, u16), String> {
    match parse_any_url(url)? {
        (host, port, false) => Ok((host, port)),
        (_, _, true) => Err("TLS (mqtts://) is supported for [upstream] only; use mqtt://".into()),
    }
}

/// An `mqtt://` or `mqtts://` URL: host, port (default 1883 or 8883), and whether it
/// is TLS.
pub(super) fn parse_any_url(url: &str) -> Result<(String, u16, bool), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not a URL like \"mqtt://broker.example:1883\""))?;
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => {
            return Err(format!(
                "scheme {other:?} is not supported; use mqtt:// or mqtts://"
            ))
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        return Err(
            "put credentials in upstream.username and upstream.password_file, not in the URL"
                .into(),
        );
    }
    if authority.contains('/') {
        return Err(format!(
            "{url:?} has a path; an MQTT URL is scheme://host[:port]"
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated IPv6 address")?;
        (h.to_owned(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = match port {
        None if tls => 8883,
        None => 1883,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port number"))?,
    };
    Ok((host, port, tls))
}
