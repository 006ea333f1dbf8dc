//! Validation of the core sections — `[agent]`, `[buffer]`, `[[socket]]`, `[upstream]` —
//! from their raw form into typed config, every problem reported through `Ctx`.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{
    LevelValue, RawAgent, RawBuffer, RawCompression, RawLink, RawRate, RawSocket, RawUpstream,
};
use super::validate::{resolve, Ctx};
use super::*;
use crate::store::{DEFAULT_COMMIT_LINGER, MIN_MAX_SIZE};

pub(super) fn validate_agent(
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
    // One event loop costs least per message at a gateway's rates (no wake-ups
    // between workers); more only help when ingest saturates a core.
    let worker_threads = ctx.int("agent.worker_threads", &raw.worker_threads, 1, 1, 64);
    Some(AgentConfig {
        gateway_id: gateway_id.unwrap_or_default(),
        data_dir,
        worker_threads: NonZeroUsize::new(worker_threads as usize).unwrap_or(NonZeroUsize::MIN),
    })
}

pub(super) fn validate_buffer(ctx: &mut Ctx<'_>, raw: RawBuffer) -> BufferConfig {
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
        DEFAULT_COMMIT_LINGER,
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

pub(super) fn validate_socket(
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

pub(super) fn check_duplicate_listens(ctx: &mut Ctx<'_>, sockets: &[SocketConfig]) {
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

pub(super) fn validate_upstream(
    ctx: &mut Ctx<'_>,
    raw: RawUpstream,
    span: Option<Range<usize>>,
    agent: Option<&AgentConfig>,
    path: &Path,
) -> Option<UpstreamConfig> {
    let (url, endpoint) = ctx
        .url_with(
            "upstream.url",
            &raw.url,
            span.clone(),
            super::validate::parse_any_url,
        )
        .unzip();
    let tls = super::tls::upstream(ctx, &raw, endpoint.as_ref().is_some_and(|e| e.2), path);
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
    let mode = ctx.choice(
        "upstream.mode",
        &raw.mode,
        &[
            ("passthrough", UpstreamMode::Passthrough),
            ("batch", UpstreamMode::Batch),
        ],
        UpstreamMode::Batch,
    );
    let batch_size = ctx.int("upstream.batch_size", &raw.batch_size, 1000, 1, 100_000);
    let batch_linger = ctx.duration(
        "upstream.batch_linger",
        &raw.batch_linger,
        Duration::from_secs(1),
        Duration::ZERO,
        Duration::from_secs(600),
    );
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
    let protocol = ctx.choice(
        "upstream.protocol",
        &raw.protocol,
        &[("5", MqttVersion::V5), ("3.1.1", MqttVersion::V311)],
        MqttVersion::V5,
    );
    let max_attempts = ctx.int("upstream.max_attempts", &raw.max_attempts, 3, 1, 100);
    let congestion = match &raw.congestion {
        None => Some("bbr".to_owned()),
        Some(f) if f.get_ref() == "system" => None,
        Some(f) => {
            let name = f.get_ref();
            // The kernel's names: at most 15 bytes (TCP_CA_NAME_MAX with its NUL).
            let valid = !name.is_empty()
                && name.len() < 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                ctx.err(
                    "upstream.congestion",
                    Some(f.span()),
                    format!("{name:?} is not a kernel congestion control name (e.g. \"bbr\", \"cubic\") nor \"system\""),
                );
            }
            Some(name.clone())
        }
    };
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
    let (host, port, _) = endpoint?;
    Some(UpstreamConfig {
        host,
        port,
        url: url?,
        client_id,
        topic_prefix,
        mode,
        batch_size: NonZeroUsize::new(batch_size as usize).unwrap_or(NonZeroUsize::MIN),
        batch_linger,
        username,
        password,
        tls,
        keep_alive,
        inflight: NonZeroU16::new(inflight as u16).unwrap_or(NonZeroU16::MIN),
        priority_connection: raw
            .priority_connection
            .as_ref()
            .is_none_or(|b| *b.get_ref()),
        congestion,
        protocol,
        max_attempts: NonZeroU16::new(max_attempts as u16).unwrap_or(NonZeroU16::MIN),
        connect_timeout,
        reconnect_min,
        reconnect_max,
    })
}

pub(super) fn validate_compression(
    ctx: &mut Ctx<'_>,
    raw: RawCompression,
    path: &Path,
) -> CompressionConfig {
    const DEFAULT_LEVEL: i32 = 3;
    let (level, auto_level) = match &raw.level {
        None => (DEFAULT_LEVEL, true),
        Some(l) => match l.get_ref() {
            LevelValue::Text(t) if t == "auto" => (DEFAULT_LEVEL, true),
            LevelValue::Number(n) if (1..=19).contains(n) => (*n as i32, false),
            other => {
                ctx.err(
                    "compression.level",
                    Some(l.span()),
                    format!("{other:?} is not \"auto\" or a zstd level from 1 to 19"),
                );
                (DEFAULT_LEVEL, true)
            }
        },
    };
    let dictionary = match raw
        .dictionary
        .as_ref()
        .map(|d| (d.get_ref().as_str(), d.span()))
    {
        None | Some(("auto", _)) => DictionarySetting::Auto,
        Some(("off", _)) => DictionarySetting::Off,
        Some(("", span)) => {
            ctx.err(
                "compression.dictionary",
                Some(span),
                "is empty: use \"auto\", \"off\" or the path of a dictionary file",
            );
            DictionarySetting::Off
        }
        Some((file, _)) => DictionarySetting::File(resolve(Path::new(file), path)),
    };
    CompressionConfig {
        level,
        auto_level,
        dictionary,
    }
}

pub(super) fn validate_link(ctx: &mut Ctx<'_>, raw: RawLink) -> LinkConfig {
    let probe = ctx.choice(
        "link.probe",
        &raw.probe,
        &[
            ("auto", ProbeSetting::Auto),
            ("ebpf", ProbeSetting::Ebpf),
            ("tcp-info", ProbeSetting::TcpInfo),
            ("off", ProbeSetting::Off),
        ],
        ProbeSetting::Auto,
    );
    LinkConfig { probe }
}

/// A rate in bit/s: "256kbit", "1.5mbit", "2gbit", or a number of bit/s.
pub(super) fn parse_bits(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let n: f64 = t[..split]
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)?;
    let mult = match t[split..].trim() {
        "" | "bit" | "bps" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return None,
    };
    Some((n * mult).round() as u64).filter(|b| *b >= 8)
}

pub(super) fn validate_rate(ctx: &mut Ctx<'_>, raw: RawRate) -> RateConfig {
    let adapt = raw.adapt.as_ref().is_none_or(|a| *a.get_ref());
    let max_rate_bps = raw
        .max_rate
        .as_ref()
        .and_then(|m| match parse_bits(m.get_ref()) {
            Some(b) => Some(b),
            None => {
                ctx.err(
                    "rate.max_rate",
                    Some(m.span()),
                    format!(
                        "{:?} is not a rate like \"256kbit\", \"2mbit\" or a number of bit/s",
                        m.get_ref()
                    ),
                );
                None
            }
        });
    RateConfig {
        adapt,
        max_rate_bps,
    }
}
