//! Validation of the TLS keys of `[upstream]` (ca_file, cert_file, key_file) and
//! `[local_mqtt]` (cert_file, key_file).
//!
//! Why here: the files are read and parsed while the config is validated, so
//! `check-config` and start-up name a missing, unreadable or malformed file with its
//! key, instead of the first connection failing later. Invariant: a TLS section that
//! validates carries a ready rustls configuration; file contents never reach a message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::raw::{Field, RawLocalMqtt, RawUpstream};
use super::validate::{resolve, Ctx};
use crate::tls::{self, ClientFiles, ServerFiles, TlsError};

/// `[upstream]` over TLS: the files and the client configuration built from them.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub files: ClientFiles,
    pub config: Arc<tokio_rustls::rustls::ClientConfig>,
}

/// `[local_mqtt]` over TLS: the files and the server configuration built from them.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub files: ServerFiles,
    pub config: Arc<tokio_rustls::rustls::ServerConfig>,
}

/// A file key: resolved against the config's directory, checked readable now.
fn file(
    ctx: &mut Ctx<'_>,
    key: &str,
    f: &Field<String>,
    path: &Path,
    check: fn(&Path) -> Result<(), TlsError>,
) -> Option<PathBuf> {
    let f = f.as_ref()?;
    let resolved = resolve(Path::new(f.get_ref()), path);
    match check(&resolved) {
        Ok(()) => Some(resolved),
        Err(e) => {
            ctx.err(key, Some(f.span()), e.to_string());
            None
        }
    }
}

fn certs(p: &Path) -> Result<(), TlsError> {
    tls::certificates(p).map(drop)
}

fn key(p: &Path) -> Result<(), TlsError> {
    tls::private_key(p).map(drop)
}

pub(super) fn upstream(
    ctx: &mut Ctx<'_>,
    raw: &RawUpstream,
    tls_url: bool,
    path: &Path,
) -> Option<UpstreamTls> {
    if !tls_url {
        for (name, f) in [
            ("ca_file", &raw.ca_file),
            ("cert_file", &raw.cert_file),
            ("key_file", &raw.key_file),
        ] {
            if let Some(f) = f {
                ctx.err(
                    format!("upstream.{name}"),
                    Some(f.span()),
                    "TLS files need an mqtts:// url",
                );
            }
        }
        return None;
    }
    let before = ctx.problems.len();
    let files = ClientFiles {
        ca_file: file(ctx, "upstream.ca_file", &raw.ca_file, path, certs),
        cert_file: file(ctx, "upstream.cert_file", &raw.cert_file, path, certs),
        key_file: file(ctx, "upstream.key_file", &raw.key_file, path, key),
    };
    if raw.cert_file.is_some() != raw.key_file.is_some() {
        let f = raw.cert_file.as_ref().or(raw.key_file.as_ref());
        ctx.err(
            "upstream.cert_file",
            f.map(|f| f.span()),
            "a client certificate needs cert_file and key_file, both",
        );
    }
    if ctx.problems.len() > before {
        return None;
    }
    match tls::client_config(&files) {
        Ok(config) => Some(UpstreamTls { files, config }),
        Err(e) => {
            let key = if raw.ca_file.is_none() && matches!(e, TlsError::NoRoots(_)) {
                "upstream.ca_file"
            } else {
                "upstream.cert_file"
            };
            ctx.err(key, None, e.to_string());
            None
        }
    }
}

pub(super) fn listener(ctx: &mut Ctx<'_>, raw: &RawLocalMqtt, path: &Path) -> Option<ListenerTls> {
    if raw.cert_file.is_none() && raw.key_file.is_none() {
        return None;
    }
    let before = ctx.problems.len();
    let cert = file(ctx, "local_mqtt.cert_file", &raw.cert_file, path, certs);
    let key_file = file(ctx, "local_mqtt.key_file", &raw.key_file, path, key);
    if raw.cert_file.is_none() || raw.key_file.is_none() {
        let f = raw.cert_file.as_ref().or(raw.key_file.as_ref());
        ctx.err(
            "local_mqtt.cert_file",
            f.map(|f| f.span()),
            "a TLS listener needs cert_file and key_file, both",
        );
    }
    if ctx.problems.len() > before {
        return None;
    }
    let files = ServerFiles {
        cert_file: cert?,
        key_file: key_file?,
    };
    match tls::server_config(&files) {
        Ok(config) => Some(ListenerTls { files, config }),
        Err(e) => {
            ctx.err("local_mqtt.key_file", None, e.to_string());
            None
        }
    }
}
