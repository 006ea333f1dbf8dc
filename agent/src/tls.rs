//! TLS for the upstream (`mqtts://`) and the optional TLS local listener: rustls with
//! the ring provider.
//!
//! Why rustls with ring: no OpenSSL on the gateway to keep patched, and ring builds
//! with the plain cross C compilers the ARM builds use (aws-lc-rs wants cmake and more).
//!
//! Invariants: the upstream's certificate is always verified — against `ca_file`, or
//! the system's roots where none is given; there is no switch to turn that off (a
//! private CA goes in `ca_file`). Errors name the file and what is wrong with it, never
//! its contents: a key never reaches a log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path:?} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path:?}: a certificate in it is not usable as a trust anchor: {reason}")]
    BadAnchor { path: PathBuf, reason: String },
    #[error(
        "no trusted CA certificates: set ca_file, or install the system's (ca-certificates){0}"
    )]
    NoRoots(String),
    #[error("cert_file and key_file must both be set, or neither")]
    HalfPair,
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS files of a client (`[upstream]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// CA certificates (PEM) the server's must chain to; None: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) and its key, for brokers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The TLS files of a server (`[local_mqtt]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every PEM certificate in `path` (at least one).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first PEM private key in `path`.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_path_buf(),
    })
}

/// ring's provider. rustls marks it deprecated because ring has no post-quantum key
/// exchange; aws-lc-rs has, but does not build with the plain cross toolchains the ARM
/// gateways are built with. Classical X25519/ECDHE is what mosquitto offers anyway.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| TlsError::BadAnchor {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                return Err(TlsError::NoRoots(why));
            }
        }
    }
    Ok(roots)
}

/// A client configuration: the server verified against `files.ca_file` (or the
/// system's roots), the client certificate presented where one is configured.
pub fn client_config(files: &ClientFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    if files.cert_file.is_some() != files.key_file.is_some() {
        return Err(TlsError::HalfPair);
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(files.ca_file.as_deref())?);
    let config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A server configuration presenting `files.cert_file`; clients are not asked for
/// certificates (local devices authenticate with username and password).
pub fn server_config(files: &ServerFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            certificates(&files.cert_file)?,
            private_key(&files.key_file)?,
        )?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("ca.pem");
        let e = client_config(&ClientFiles {
            ca_file: Some(missing.clone()),
            ..Default::default()
        })
        .expect_err("must fail");
        assert!(
            matches!(e, TlsError::Read { ref path, .. } if *path == missing),
            "{e}"
        );
        assert!(e.to_string().contains("ca.pem"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let e = certificates(&garbage).expect_err("must fail");
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = private_key(&garbage).expect_err("must fail");
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let e = client_config(&ClientFiles {
            ca_file: None,
            cert_file: Some("/nonexistent/cert.pem".into()),
            key_file: None,
        })
        .expect_err("must fail");
        assert!(matches!(e, TlsError::HalfPair), "{e}");
    }
}
