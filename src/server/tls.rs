//! TLS with rustls on the aws-lc-rs provider: TLS 1.2 and 1.3 only, limited to the
//! cipher suites the spec names (spec: API content type), ALPN `h2` and `http/1.1`.
//!
//! Optional mutual TLS (spec: Authentication, SHOULD): the client must present a
//! certificate that chains to the configured CA bundle, is within its validity period,
//! and names one of the allowed subjects (KMS presents `cks.kms.<region>.amazonaws.com`)
//! as its common name or a DNS subject alternative name. Anything else — no
//! certificate, an expired or self-signed one, another name — fails the handshake.

use crate::config::{MtlsSettings, TlsSettings};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::aws_lc_rs::{self, cipher_suite};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No certificate or key in the file.
    #[error("{0}")]
    Missing(String),
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The mTLS CA bundle cannot verify clients.
    #[error("mTLS CA bundle: {0}")]
    ClientVerifier(String),
    /// A certificate could not be parsed.
    #[error("{path}: not a parsable X.509 certificate")]
    Parse {
        /// The file.
        path: String,
    },
}

/// Verifies the chain with webpki, then the subject against the allow-list.
#[derive(Debug)]
struct SubjectVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

/// The common names and DNS subject alternative names of a certificate.
pub fn subject_names(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    Some(names)
}

impl ClientCertVerifier for SubjectVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
        {
            tracing::warn!(error = %e, "client certificate refused");
            return Err(e);
        }
        let names = subject_names(end_entity).unwrap_or_default();
        let allowed = names
            .iter()
            .any(|n| self.allowed.iter().any(|a| a.eq_ignore_ascii_case(n)));
        if allowed {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(subjects = ?names, "client certificate subject is not allowed");
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

fn client_verifier(
    mtls: &MtlsSettings,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(&mtls.ca_bundle)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
    }
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
    Ok(Arc::new(SubjectVerifier {
        chain,
        allowed: mtls.allowed_subjects.clone(),
    }))
}

/// When the leaf certificate of a PEM chain expires.
pub fn certificate_not_after(path: &Path) -> Result<SystemTime, TlsError> {
    let certs = load_certificates(path)?;
    let parse = || TlsError::Parse {
        path: path.display().to_string(),
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).map_err(|_| parse())?;
    let seconds = u64::try_from(cert.validity().not_after.timestamp()).map_err(|_| parse())?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// The spec's cipher suites, in our order of preference.
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ],
        ..aws_lc_rs::default_provider()
    }
}

/// Reads a PEM certificate chain.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing(format!(
            "{}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?);
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::Missing(format!("{}: no PEM private key found", path.display())))
}

/// The server's TLS configuration.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certificates(&settings.certificate)?;
    let key = load_private_key(&settings.private_key)?;
    let provider = Arc::new(provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &settings.mtls {
        Some(mtls) => builder.with_client_cert_verifier(client_verifier(mtls, &provider)?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = if settings.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}
