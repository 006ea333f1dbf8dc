//! Raw TOML → typed `Config`, collecting every problem instead of stopping at the first.
//!
//! Each section is deserialised on its own (a structural error in one section does not
//! hide problems in another) and every leaf value is checked with its key and line.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::raw::{
    Field, RawAgent, RawBuffer, RawLocalBroker, RawLocalMqtt, RawSocket, RawUpstream, SizeValue,
};
use super::*;
use crate::store::MIN_MAX_SIZE;

/// Sections named in the design but delivered by later work: recognised, so the error
/// says what is going on rather than "unknown key".
const NOT_YET: &[&str] = &["compression", "link", "rate", "policy", "metrics"];

pub(super) struct Ctx<'a> {
    text: &'a str,
    problems: Vec<Problem>,
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
        let url = self.required(key, f, section_span)?;
        match parse_url(&url) {
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
    let mut upstream = None;
    let mut local_mqtt = None;
    let mut local_broker = None;
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
            other if NOT_YET.contains(&other) => ctx.err(
                other,
                Some(k.span()),
                "this section is not supported by this version of edgerelay yet",
            ),
            other => ctx.err(other, Some(k.span()), "unknown section"),
        }
    }
    let agent = validate_agent(&mut ctx, agent, spans.get("agent").cloned(), path);
    let buffer = validate_buffer(&mut ctx, buffer.unwrap_or_default());
    let sockets: Vec<SocketConfig> = sockets
        .into_iter()
        .filter_map(|(key, span, raw)| validate_socket(&mut ctx, &key, span, raw, path))
        .collect();
    check_duplicate_listens(&mut ctx, &sockets);
    let upstream = match upstream {
        Some(raw) => validate_upstream(
            &mut ctx,
            raw,
            spans.get("upstream").cloned(),
            agent.as_ref(),
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
    match (agent, upstream) {
        (Some(agent), Some(upstream)) if ctx.problems.is_empty() => Ok(Config {
            agent,
            buffer,
            sockets,
            local_mqtt,
            local_broker,
            upstream,
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

fn validate_agent(
    ctx: &mut Ctx<'_>,
    raw: Option<RawAgent>,
    span: Option<Range<usize>>,
    path: &Path,
) -> Option<AgentConfig> {
    let Some(raw) = raw else {
        if span.is_none() {
            ctx.err(
                "agent",
                None,
                "section [agent] is required (gateway_id at least)",
            );
        }
        return None;
    };
    let gateway_id = ctx.required("agent.gateway_id", &raw.gateway_id, span);
    if let (Some(id), Some(f)) = (&gateway_id, &raw.gateway_id) {
        let ok = id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            ctx.err(
                "agent.gateway_id",
                Some(f.span()),
                "use 1 to 64 characters of A-Z a-z 0-9 - _ . (it becomes part of MQTT topics)",
            );
        }
    }
    let data_dir = raw
        .data_dir
        .as_ref()
        .map_or(PathBuf::from("/var/lib/edgerelay"), |s| {
            resolve(Path::new(s.get_ref()), path)
        });
    Some(AgentConfig {
        gateway_id: gateway_id.unwrap_or_default(),
        data_dir,
    })
}

fn validate_buffer(ctx: &mut Ctx<'_>, raw: RawBuffer) -> BufferConfig {
    const TIB: u64 = 1 << 40;
    let max_size = ctx.size(
        "buffer.max_size",
        &raw.max_size,
        512 << 20,
        MIN_MAX_SIZE,
        16 * TIB,
    );
    let max_age = ctx.duration(
        "buffer.max_age",
        &raw.max_age,
        Duration::from_secs(2 * 3600),
        Duration::from_secs(1),
        Duration::from_secs(365 * 24 * 3600),
    );
    let when_full = ctx.choice(
        "buffer.when_full",
        &raw.when_full,
        &[
            ("drop-oldest", WhenFull::DropOldest),
            ("reject-new", WhenFull::RejectNew),
        ],
        WhenFull::DropOldest,
    );
    let commit_max_records = ctx.int(
        "buffer.commit_max_records",
        &raw.commit_max_records,
        512,
        1,
        65_536,
    );
    let commit_linger = ctx.duration(
        "buffer.commit_linger",
        &raw.commit_linger,
        Duration::ZERO,
        Duration::ZERO,
        Duration::from_secs(1),
    );
    let cache_size = ctx.size(
        "buffer.cache_size",
        &raw.cache_size,
        1 << 20,
        256 << 10,
        1 << 30,
    );
    BufferConfig {
        max_size,
        max_age,
        when_full,
        commit_max_records: NonZeroUsize::new(commit_max_records as usize)
            .unwrap_or(NonZeroUsize::MIN),
        commit_linger,
        cache_size,
    }
}

fn validate_socket(
    ctx: &mut Ctx<'_>,
    key: &str,
    span: Range<usize>,
    raw: RawSocket,
    path: &Path,
) -> Option<SocketConfig> {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Tcp,
        Udp,
        Unix,
    }
    let kind_key = format!("{key}.kind");
    let kind = match &raw.kind {
        None => {
            ctx.err(
                kind_key,
                Some(span.clone()),
                "is required (\"tcp\", \"udp\" or \"unix\")",
            );
            None
        }
        Some(_) => {
            let before = ctx.problems.len();
            let k = ctx.choice(
                &kind_key,
                &raw.kind,
                &[("tcp", Kind::Tcp), ("udp", Kind::Udp), ("unix", Kind::Unix)],
                Kind::Tcp,
            );
            (ctx.problems.len() == before).then_some(k)
        }
    };
    let listen_key = format!("{key}.listen");
    let listen_raw = ctx.required(&listen_key, &raw.listen, Some(span.clone()));
    let listen = match (kind, listen_raw) {
        (Some(Kind::Unix), Some(p)) => Some(Listen::Unix(resolve(Path::new(&p), path))),
        (Some(k), Some(a)) => match a.parse::<SocketAddr>() {
            Ok(addr) if k == Kind::Tcp => Some(Listen::Tcp(addr)),
            Ok(addr) => Some(Listen::Udp(addr)),
            Err(_) => {
                let s = raw.listen.as_ref().map(|s| s.span());
                ctx.err(
                    &listen_key,
                    s,
                    format!("{a:?} is not an address like \"127.0.0.1:7001\""),
                );
                None
            }
        },
        _ => None,
    };
    let framing_key = format!("{key}.framing");
    let framing = match kind {
        Some(Kind::Udp) => {
            if let Some(f) = &raw.framing {
                if f.get_ref() != "datagram" {
                    ctx.err(&framing_key, Some(f.span()), "UDP sockets take one datagram per message: leave framing out or set \"datagram\"");
                }
            }
            Framing::Datagram
        }
        _ => ctx.choice(
            &framing_key,
            &raw.framing,
            &[
                ("lines", Framing::Lines),
                ("length-prefixed", Framing::LengthPrefixed),
            ],
            Framing::Lines,
        ),
    };
    let topic_key = format!("{key}.topic");
    let topic = ctx.required(&topic_key, &raw.topic, Some(span.clone()));
    if let (Some(t), Some(f)) = (&topic, &raw.topic) {
        if let Err(m) = crate::topic::check_name(t) {
            ctx.err(&topic_key, Some(f.span()), m);
        }
    }
    let max_message_size = ctx.size(
        &format!("{key}.max_message_size"),
        &raw.max_message_size,
        64 << 10,
        1,
        256 << 20,
    );
    let ack = raw.ack.as_ref().is_some_and(|a| *a.get_ref());
    if ack && kind == Some(Kind::Udp) {
        let s = raw.ack.as_ref().map(|a| a.span());
        ctx.err(
            format!("{key}.ack"),
            s,
            "UDP has no connection to acknowledge on; only stream sockets support ack",
        );
    }
    let max_connections = ctx.int(
        &format!("{key}.max_connections"),
        &raw.max_connections,
        256,
        1,
        65_536,
    );
    Some(SocketConfig {
        listen: listen?,
        framing,
        topic: topic?,
        max_message_size: NonZeroUsize::new(max_message_size as usize).unwrap_or(NonZeroUsize::MIN),
        ack,
        max_connections: NonZeroUsize::new(max_connections as usize).unwrap_or(NonZeroUsize::MIN),
    })
}

fn check_duplicate_listens(ctx: &mut Ctx<'_>, sockets: &[SocketConfig]) {
    for (i, a) in sockets.iter().enumerate() {
        if sockets[..i].iter().any(|b| b.listen == a.listen) {
            ctx.err(
                format!("socket[{i}].listen"),
                None,
                format!("{} is used by an earlier [[socket]]", a.listen),
            );
        }
    }
}

pub(super) fn parse_url(url: &str) -> Result<(String, u16), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not a URL like \"mqtt://broker.example:1883\""))?;
    match scheme {
        "mqtt" | "tcp" => {}
        "mqtts" | "ssl" => {
            return Err(
                "TLS upstreams (mqtts://) are not supported by this version of edgerelay yet"
                    .into(),
            )
        }
        other => return Err(format!("scheme {other:?} is not supported; use mqtt://")),
    }
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
        None => 1883,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port number"))?,
    };
    Ok((host, port))
}

fn validate_upstream(
    ctx: &mut Ctx<'_>,
    raw: RawUpstream,
    span: Option<Range<usize>>,
    agent: Option<&AgentConfig>,
) -> Option<UpstreamConfig> {
    let (url, endpoint) = ctx.mqtt_url("upstream.url", &raw.url, span.clone()).unzip();
    let gateway = agent.map(|a| a.gateway_id.as_str()).unwrap_or("gateway");
    let client_id = raw.client_id.as_ref().map_or_else(
        || format!("edgerelay-{gateway}"),
        |s| s.get_ref().replace("{gateway_id}", gateway),
    );
    if let Some(f) = &raw.client_id {
        if client_id.is_empty() || client_id.len() > 65535 {
            ctx.err(
                "upstream.client_id",
                Some(f.span()),
                "must be 1 to 65535 bytes",
            );
        }
    }
    let topic_prefix = raw.topic_prefix.as_ref().map_or_else(
        || format!("edgerelay/{gateway}"),
        |s| s.get_ref().replace("{gateway_id}", gateway),
    );
    if let Some(f) = &raw.topic_prefix {
        if topic_prefix.contains(['+', '#', '\0']) || topic_prefix.ends_with('/') {
            ctx.err(
                "upstream.topic_prefix",
                Some(f.span()),
                "must not contain + # or NUL, nor end with /",
            );
        }
    }
    let mode = match &raw.mode {
        Some(m) if m.get_ref() == "batch" => {
            ctx.err(
                "upstream.mode",
                Some(m.span()),
                "batch mode is not available in this version of edgerelay yet; use \"passthrough\"",
            );
            UpstreamMode::Passthrough
        }
        _ => ctx.choice(
            "upstream.mode",
            &raw.mode,
            &[("passthrough", UpstreamMode::Passthrough)],
            UpstreamMode::Passthrough,
        ),
    };
    let (username, password) =
        ctx.credentials("upstream", &raw.username, &raw.password, &raw.password_file);
    let keep_alive = ctx.duration(
        "upstream.keep_alive",
        &raw.keep_alive,
        Duration::from_secs(30),
        Duration::from_secs(5),
        Duration::from_secs(65_535),
    );
    let inflight = ctx.int("upstream.inflight", &raw.inflight, 64, 1, 65_535);
    let connect_timeout = ctx.duration(
        "upstream.connect_timeout",
        &raw.connect_timeout,
        Duration::from_secs(10),
        Duration::from_millis(100),
        Duration::from_secs(300),
    );
    let reconnect_min = ctx.duration(
        "upstream.reconnect_min",
        &raw.reconnect_min,
        Duration::from_millis(500),
        Duration::from_millis(10),
        Duration::from_secs(3600),
    );
    let reconnect_max = ctx.duration(
        "upstream.reconnect_max",
        &raw.reconnect_max,
        Duration::from_secs(30),
        Duration::from_millis(10),
        Duration::from_secs(3600),
    );
    if reconnect_min > reconnect_max {
        let s = raw.reconnect_min.as_ref().map(|s| s.span());
        ctx.err("upstream.reconnect_min", s, "must not exceed reconnect_max");
    }
    let (host, port) = endpoint?;
    Some(UpstreamConfig {
        host,
        port,
        url: url?,
        client_id,
        topic_prefix,
        mode,
        username,
        password,
        keep_alive,
        inflight: NonZeroU16::new(inflight as u16).unwrap_or(NonZeroU16::MIN),
        connect_timeout,
        reconnect_min,
        reconnect_max,
    })
}
