//! Validation of the local MQTT sections: `[local_mqtt]` (the embedded endpoint) and
//! `[local_broker]` (client mode against a broker already on the gateway).

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use super::raw::{RawLocalBroker, RawLocalMqtt};
use super::validate::{resolve, Ctx};
use super::{BufferConfig, LocalBrokerConfig, LocalMqttConfig};
use crate::store::Budget;

pub(super) fn validate_local_mqtt(
    ctx: &mut Ctx<'_>,
    raw: RawLocalMqtt,
    buffer: &BufferConfig,
    path: &Path,
) -> Option<LocalMqttConfig> {
    let listen = match &raw.listen {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 1883))),
        Some(s) => match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                ctx.err(
                    "local_mqtt.listen",
                    Some(s.span()),
                    format!(
                        "{:?} is not an address like \"127.0.0.1:1883\"",
                        s.get_ref()
                    ),
                );
                None
            }
        },
    };
    let max_connections = ctx.int(
        "local_mqtt.max_connections",
        &raw.max_connections,
        1024,
        1,
        1_000_000,
    );
    // A packet must always fit in the buffer, or a client could send one that can never
    // be acknowledged.
    let data_budget = Budget::from_max_size(buffer.max_size, buffer.when_full).data_bytes;
    let max_packet_size = ctx.size(
        "local_mqtt.max_packet_size",
        &raw.max_packet_size,
        256 << 10,
        64,
        (data_budget / 4).min(256 << 20),
    );
    let receive_maximum = ctx.int(
        "local_mqtt.receive_maximum",
        &raw.receive_maximum,
        64,
        1,
        65_535,
    );
    let topics = ctx.filters("local_mqtt.topics", &raw.topics, &["#"]);
    let password_file = raw
        .password_file
        .as_ref()
        .map(|p| resolve(Path::new(p.get_ref()), path));
    if let (Some(file), Some(f)) = (&password_file, &raw.password_file) {
        if let Err(e) = std::fs::metadata(file) {
            ctx.err(
                "local_mqtt.password_file",
                Some(f.span()),
                format!("cannot read {}: {e}", file.display()),
            );
        }
    }
    let allow_anonymous = raw
        .allow_anonymous
        .as_ref()
        .map_or(password_file.is_none(), |a| *a.get_ref());
    let connect_timeout = ctx.duration(
        "local_mqtt.connect_timeout",
        &raw.connect_timeout,
        Duration::from_secs(10),
        Duration::from_millis(100),
        Duration::from_secs(300),
    );
    let tls = super::tls::listener(ctx, &raw, path);
    Some(LocalMqttConfig {
        listen: listen?,
        max_connections: NonZeroUsize::new(max_connections as usize).unwrap_or(NonZeroUsize::MIN),
        max_packet_size: NonZeroUsize::new(max_packet_size as usize).unwrap_or(NonZeroUsize::MIN),
        receive_maximum: NonZeroU16::new(receive_maximum as u16).unwrap_or(NonZeroU16::MIN),
        topics,
        password_file,
        allow_anonymous,
        connect_timeout,
        tls,
    })
}

pub(super) fn validate_local_broker(
    ctx: &mut Ctx<'_>,
    raw: RawLocalBroker,
    span: Option<Range<usize>>,
    gateway: &str,
) -> Option<LocalBrokerConfig> {
    let (url, endpoint) = ctx
        .mqtt_url("local_broker.url", &raw.url, span.clone())
        .unzip();
    if raw.topics.is_none() {
        ctx.err(
            "local_broker.topics",
            span,
            "is required: the topic filters to relay, e.g. [\"sensors/#\"]",
        );
    }
    let topics = ctx.filters("local_broker.topics", &raw.topics, &[]);
    let client_id = raw.client_id.as_ref().map_or_else(
        || format!("edgerelay-{gateway}-local"),
        |s| s.get_ref().replace("{gateway_id}", gateway),
    );
    let (username, password) = ctx.credentials(
        "local_broker",
        &raw.username,
        &raw.password,
        &raw.password_file,
    );
    let keep_alive = ctx.duration(
        "local_broker.keep_alive",
        &raw.keep_alive,
        Duration::from_secs(30),
        Duration::from_secs(5),
        Duration::from_secs(65_535),
    );
    let (host, port) = endpoint?;
    Some(LocalBrokerConfig {
        host,
        port,
        url: url?,
        topics,
        client_id,
        username,
        password,
        keep_alive,
    })
}
