//! The certificate roots every HTTPS client of a container trusts, chosen once.
//!
//! By default the roots are Mozilla's, compiled into the binary
//! (`webpki-root-certs`): nothing is read from disk at start-up, and the
//! Dataverse client and the AWS SDK trust the same set. Loading the platform's
//! store instead reads and parses every certificate file under `/etc/ssl` once per
//! client, most of a cold start's CPU. `CONNECT_DYNAMICS_TLS_ROOTS=platform`
//! switches both clients to the platform's store, for an environment that adds
//! its own CA (a TLS-inspecting proxy, a private endpoint).

use std::sync::Arc;

use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use base64::Engine;

/// The environment variable that selects the roots: `built-in` (default) or `platform`.
pub const TLS_ROOTS_VAR: &str = "CONNECT_DYNAMICS_TLS_ROOTS";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{TLS_ROOTS_VAR} is {0:?}: expected `built-in` or `platform`")]
    UnknownRoots(String),
    #[error("the TLS configuration was refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the AWS SDK refused the TLS configuration: {0}")]
    Aws(#[from] aws_smithy_http_client::HttpClientError),
}

/// Which roots a container trusts, built once and shared by its HTTPS clients.
#[derive(Clone, Debug)]
pub enum TlsRoots {
    /// Mozilla's roots compiled in: the rustls configuration for the Dataverse
    /// client, and the same certificates for the AWS SDK.
    BuiltIn(Arc<rustls::ClientConfig>),
    /// The operating system's store, loaded by each client.
    Platform,
}

impl TlsRoots {
    /// From `CONNECT_DYNAMICS_TLS_ROOTS`, built-in when it is unset.
    pub fn from_env() -> Result<Self, TlsError> {
        Self::named(std::env::var(TLS_ROOTS_VAR).ok().as_deref())
    }

    /// The roots a `CONNECT_DYNAMICS_TLS_ROOTS` value names.
    fn named(setting: Option<&str>) -> Result<Self, TlsError> {
        match setting.map(str::trim) {
            None | Some("" | "built-in") => Self::built_in(),
            Some("platform") => Ok(Self::Platform),
            Some(other) => Err(TlsError::UnknownRoots(other.to_owned())),
        }
    }

    pub fn built_in() -> Result<Self, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(built_in_roots())
        .with_no_client_auth();
        Ok(Self::BuiltIn(Arc::new(config)))
    }

    /// A `reqwest` builder that trusts these roots.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        match self {
            Self::BuiltIn(config) => builder.tls_backend_preconfigured(config.as_ref().clone()),
            Self::Platform => builder,
        }
    }

    /// The AWS SDK's HTTPS client (hyper and rustls with aws-lc, as the SDK's own
    /// default) trusting these roots, its connector built once, for the first request.
    pub fn aws_http_client(&self) -> Result<SharedHttpClient, TlsError> {
        let trust_store = match self {
            Self::BuiltIn(_) => webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().fold(
                TrustStore::empty().with_native_roots(false),
                |store, certificate| store.with_pem_certificate(pem(certificate)),
            ),
            Self::Platform => TrustStore::default(),
        };
        let context = TlsContext::builder()
            .with_trust_store(trust_store)
            .build()?;
        let client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .tls_context(context)
            .build_https();
        Ok(SharedHttpClient::new(BuiltOnFirstUse(client)))
    }
}

/// The SDK's client without its start-up check, which makes each SDK client's
/// constructor build a whole connector (every root decoded and parsed) and throw
/// it away: six times per container. The connector is built once, for the first
/// request, and the client caches it.
#[derive(Debug)]
struct BuiltOnFirstUse(SharedHttpClient);

impl HttpClient for BuiltOnFirstUse {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        self.0.http_connector(settings, components)
    }

    fn connector_metadata(&self) -> Option<ConnectorMetadata> {
        self.0.connector_metadata()
    }
}

fn built_in_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    roots
}

/// The SDK takes extra roots as PEM only.
fn pem(certificate: &[u8]) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(certificate);
    let mut pem = String::with_capacity(encoded.len() + encoded.len() / 64 + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    // Char boundaries are byte boundaries: base64 is ASCII.
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_root_is_trusted_by_both_clients() {
        let count = webpki_root_certs::TLS_SERVER_ROOT_CERTS.len();
        assert!(count > 100, "Mozilla's store has well over 100 roots");
        // The reqwest side: every certificate became a trust anchor.
        assert_eq!(built_in_roots().len(), count);
        // The SDK side: every PEM decodes back to the same certificate.
        for certificate in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
            use rustls::pki_types::pem::PemObject;
            let decoded = rustls::pki_types::CertificateDer::from_pem_slice(&pem(certificate))
                .expect("valid PEM");
            assert_eq!(decoded.as_ref(), certificate.as_ref());
        }
        TlsRoots::built_in()
            .and_then(|roots| roots.aws_http_client())
            .expect("the SDK takes the built-in roots");
    }

    #[test]
    fn the_setting_names_the_roots_and_an_unknown_one_is_refused_by_name() {
        assert!(matches!(TlsRoots::named(None), Ok(TlsRoots::BuiltIn(_))));
        assert!(matches!(
            TlsRoots::named(Some(" built-in ")),
            Ok(TlsRoots::BuiltIn(_))
        ));
        assert!(matches!(
            TlsRoots::named(Some("platform")),
            Ok(TlsRoots::Platform)
        ));
        let error = TlsRoots::named(Some("system")).expect_err("not a setting");
        let error = error.to_string();
        assert!(
            error.contains(TLS_ROOTS_VAR) && error.contains("system"),
            "{error}"
        );
    }
}
