//! The operator's sections: `[metrics]` (the HTTP endpoint for Prometheus, health and
//! `edgerelay status`, and when a silent uplink counts as stuck) and `[log]`.

use std::net::SocketAddr;
use std::time::Duration;

use super::raw::{RawLog, RawMetrics};
use super::validate::Ctx;
use super::{LogConfig, LogFormat, MetricsConfig};

/// Where the endpoint listens unless told: loopback, Prometheus' usual exporter range.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

pub(super) fn validate_metrics(ctx: &mut Ctx<'_>, raw: RawMetrics) -> MetricsConfig {
    let listen = match raw.listen.as_ref() {
        None => DEFAULT_METRICS_LISTEN.parse().ok(),
        Some(s) if s.get_ref() == "off" => None,
        Some(s) => match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                ctx.err(
                    "metrics.listen",
                    Some(s.span()),
                    format!(
                        "{:?} is not an address like \"127.0.0.1:9464\" (or \"off\")",
                        s.get_ref()
                    ),
                );
                None
            }
        },
    };
    let stuck_after = ctx.duration(
        "metrics.stuck_after",
        &raw.stuck_after,
        Duration::from_secs(120),
        Duration::from_secs(5),
        Duration::from_secs(86_400),
    );
    MetricsConfig {
        listen,
        stuck_after,
    }
}

pub(super) fn validate_log(ctx: &mut Ctx<'_>, raw: RawLog) -> LogConfig {
    let level = match raw.level.as_ref() {
        None => "info".to_owned(),
        Some(s) => {
            let text = s.get_ref().trim().to_owned();
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(&text) {
                ctx.err(
                    "log.level",
                    Some(s.span()),
                    format!("{text:?} is not a log filter like \"info\" or \"edgerelay=debug,info\": {e}"),
                );
            }
            text
        }
    };
    let format = ctx.choice(
        "log.format",
        &raw.format,
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        LogFormat::Text,
    );
    LogConfig { level, format }
}
