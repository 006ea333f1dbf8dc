//! The effective configuration as TOML, for `check-config`: defaults filled in, units
//! written back in the same notation the file accepts, secrets masked.

use toml::{Table, Value};

use super::*;
use crate::policy::Degrade;

/// Bytes in the largest binary unit that divides them exactly ("512MiB", "1500B").
pub fn size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, factor) in UNITS {
        if n >= factor && n.is_multiple_of(factor) {
            return format!("{}{unit}", n / factor);
        }
    }
    format!("{n}B")
}

fn dur(d: Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string())
}

fn s(v: impl Into<String>) -> Value {
    Value::String(v.into())
}

pub fn render(c: &Config) -> String {
    let mut root = Table::new();

    let mut agent = Table::new();
    agent.insert("gateway_id".into(), s(&c.agent.gateway_id));
    agent.insert("data_dir".into(), s(c.agent.data_dir.display().to_string()));
    agent.insert(
        "worker_threads".into(),
        Value::Integer(c.agent.worker_threads.get() as i64),
    );
    root.insert("agent".into(), Value::Table(agent));

    let b = &c.buffer;
    let mut buffer = Table::new();
    buffer.insert("max_size".into(), s(size(b.max_size)));
    buffer.insert("max_age".into(), dur(b.max_age));
    buffer.insert(
        "when_full".into(),
        s(match b.when_full {
            WhenFull::DropOldest => "drop-oldest",
            WhenFull::RejectNew => "reject-new",
        }),
    );
    buffer.insert(
        "commit_max_records".into(),
        Value::Integer(b.commit_max_records.get() as i64),
    );
    buffer.insert("commit_linger".into(), dur(b.commit_linger));
    buffer.insert("cache_size".into(), s(size(b.cache_size)));
    root.insert("buffer".into(), Value::Table(buffer));

    let sockets: Vec<Value> = c
        .sockets
        .iter()
        .map(|sc| {
            let mut t = Table::new();
            let (kind, listen) = match &sc.listen {
                Listen::Tcp(a) => ("tcp", a.to_string()),
                Listen::Udp(a) => ("udp", a.to_string()),
                Listen::Unix(p) => ("unix", p.display().to_string()),
            };
            t.insert("kind".into(), s(kind));
            t.insert("listen".into(), s(listen));
            t.insert(
                "framing".into(),
                s(match sc.framing {
                    Framing::Lines => "lines",
                    Framing::LengthPrefixed => "length-prefixed",
                    Framing::Datagram => "datagram",
                }),
            );
            t.insert("topic".into(), s(&sc.topic));
            t.insert(
                "max_message_size".into(),
                s(size(sc.max_message_size.get() as u64)),
            );
            t.insert("ack".into(), Value::Boolean(sc.ack));
            t.insert(
                "max_connections".into(),
                Value::Integer(sc.max_connections.get() as i64),
            );
            Value::Table(t)
        })
        .collect();
    if !sockets.is_empty() {
        root.insert("socket".into(), Value::Array(sockets));
    }

    if let Some(m) = &c.local_mqtt {
        let mut t = Table::new();
        t.insert("listen".into(), s(m.listen.to_string()));
        t.insert(
            "max_connections".into(),
            Value::Integer(m.max_connections.get() as i64),
        );
        t.insert(
            "max_packet_size".into(),
            s(size(m.max_packet_size.get() as u64)),
        );
        t.insert(
            "receive_maximum".into(),
            Value::Integer(i64::from(m.receive_maximum.get())),
        );
        t.insert(
            "topics".into(),
            Value::Array(m.topics.iter().map(s).collect()),
        );
        if let Some(p) = &m.password_file {
            t.insert("password_file".into(), s(p.display().to_string()));
        }
        t.insert("allow_anonymous".into(), Value::Boolean(m.allow_anonymous));
        t.insert("connect_timeout".into(), dur(m.connect_timeout));
        if let Some(tls) = &m.tls {
            t.insert(
                "cert_file".into(),
                s(tls.files.cert_file.display().to_string()),
            );
            t.insert(
                "key_file".into(),
                s(tls.files.key_file.display().to_string()),
            );
        }
        root.insert("local_mqtt".into(), Value::Table(t));
    }

    if let Some(b) = &c.local_broker {
        let mut t = Table::new();
        t.insert("url".into(), s(&b.url));
        t.insert(
            "topics".into(),
            Value::Array(b.topics.iter().map(s).collect()),
        );
        t.insert("client_id".into(), s(&b.client_id));
        if let Some(name) = &b.username {
            t.insert("username".into(), s(name));
        }
        if b.password.is_some() {
            t.insert("password".into(), s("***"));
        }
        t.insert("keep_alive".into(), dur(b.keep_alive));
        root.insert("local_broker".into(), Value::Table(t));
    }

    let mut comp = Table::new();
    comp.insert(
        "level".into(),
        if c.compression.auto_level {
            s("auto")
        } else {
            Value::Integer(i64::from(c.compression.level))
        },
    );
    comp.insert(
        "dictionary".into(),
        match &c.compression.dictionary {
            DictionarySetting::Off => s("off"),
            DictionarySetting::Auto => s("auto"),
            DictionarySetting::File(p) => s(p.display().to_string()),
        },
    );
    root.insert("compression".into(), Value::Table(comp));

    let mut link = Table::new();
    link.insert("probe".into(), s(c.link.probe.as_str()));
    root.insert("link".into(), Value::Table(link));

    let mut rate = Table::new();
    rate.insert("adapt".into(), Value::Boolean(c.rate.adapt));
    if let Some(b) = c.rate.max_rate_bps {
        rate.insert("max_rate".into(), s(b.to_string()));
    }
    root.insert("rate".into(), Value::Table(rate));

    let policies: Vec<Value> = c
        .policies
        .list()
        .iter()
        .map(|p| {
            let mut t = Table::new();
            t.insert(
                "topics".into(),
                Value::Array(p.topics.iter().map(|f| s(f.as_str())).collect()),
            );
            t.insert("stream".into(), s(&p.stream));
            t.insert("priority".into(), s(p.priority.as_str()));
            t.insert(
                "degrade".into(),
                s(match p.degrade {
                    Degrade::None => "none".to_owned(),
                    Degrade::Latest => "latest".to_owned(),
                    Degrade::Sample(d) => format!("sample:{}", humantime::format_duration(d)),
                }),
            );
            t.insert("drain".into(), s(p.drain.as_str()));
            Value::Table(t)
        })
        .collect();
    if !policies.is_empty() {
        root.insert("policy".into(), Value::Array(policies));
    }

    let u = &c.upstream;
    let mut up = Table::new();
    up.insert("url".into(), s(&u.url));
    up.insert("client_id".into(), s(&u.client_id));
    up.insert("topic_prefix".into(), s(&u.topic_prefix));
    up.insert(
        "mode".into(),
        s(match u.mode {
            UpstreamMode::Passthrough => "passthrough",
            UpstreamMode::Batch => "batch",
        }),
    );
    up.insert(
        "batch_size".into(),
        Value::Integer(u.batch_size.get() as i64),
    );
    up.insert("batch_linger".into(), dur(u.batch_linger));
    if let Some(name) = &u.username {
        up.insert("username".into(), s(name));
    }
    if u.password.is_some() {
        up.insert("password".into(), s("***"));
    }
    if let Some(tls) = &u.tls {
        for (key, file) in [
            ("ca_file", &tls.files.ca_file),
            ("cert_file", &tls.files.cert_file),
            ("key_file", &tls.files.key_file),
        ] {
            if let Some(f) = file {
                up.insert(key.into(), s(f.display().to_string()));
            }
        }
    }
    up.insert("keep_alive".into(), dur(u.keep_alive));
    up.insert(
        "inflight".into(),
        Value::Integer(i64::from(u.inflight.get())),
    );
    up.insert(
        "priority_connection".into(),
        Value::Boolean(u.priority_connection),
    );
    up.insert(
        "protocol".into(),
        s(match u.protocol {
            MqttVersion::V5 => "5",
            MqttVersion::V311 => "3.1.1",
        }),
    );
    up.insert(
        "max_attempts".into(),
        Value::Integer(i64::from(u.max_attempts.get())),
    );
    up.insert(
        "congestion".into(),
        s(u.congestion.as_deref().unwrap_or("system")),
    );
    up.insert("connect_timeout".into(), dur(u.connect_timeout));
    up.insert("reconnect_min".into(), dur(u.reconnect_min));
    up.insert("reconnect_max".into(), dur(u.reconnect_max));
    root.insert("upstream".into(), Value::Table(up));

    let mut metrics = Table::new();
    metrics.insert(
        "listen".into(),
        s(c.metrics
            .listen
            .map_or_else(|| "off".to_owned(), |a| a.to_string())),
    );
    metrics.insert("stuck_after".into(), dur(c.metrics.stuck_after));
    root.insert("metrics".into(), Value::Table(metrics));

    let mut log = Table::new();
    log.insert("level".into(), s(&c.log.level));
    log.insert(
        "format".into(),
        s(match c.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }),
    );
    root.insert("log".into(), Value::Table(log));

    toml::to_string(&root).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}
