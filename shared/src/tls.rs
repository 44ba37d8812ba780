//! The container's one HTTPS client and the certificate roots it trusts, chosen once.
//!
//! By default the roots are Mozilla's, compiled into the binary as trust anchors
//! (`webpki-roots`): nothing is read from disk or parsed at start-up, and the
//! Dataverse client and the AWS SDK (`crate::aws_http`) share the one client.
//! Loading the platform's store instead reads and parses every certificate file
//! under `/etc/ssl`, most of a cold start's CPU. `CONNECT_DYNAMICS_TLS_ROOTS=platform`
//! switches to it, for an environment that adds its own CA (a TLS-inspecting
//! proxy, a private endpoint).

use std::sync::Arc;
use std::time::Duration;

/// How long a connection (TCP and TLS) may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The environment variable that selects the roots: `built-in` (default) or `platform`.
pub const TLS_ROOTS_VAR: &str = "CONNECT_DYNAMICS_TLS_ROOTS";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{TLS_ROOTS_VAR} is {0:?}: expected `built-in` or `platform`")]
    UnknownRoots(String),
    #[error("the TLS configuration was refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Which roots a container trusts, built once and shared by its HTTPS clients.
#[derive(Clone, Debug)]
pub enum TlsRoots {
    /// Mozilla's roots compiled in, as one rustls configuration.
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

    /// The container's one HTTPS client, shared by Dataverse, Entra ID, Amazon
    /// Connect and the AWS SDK (`crate::aws_http`): rustls with these roots,
    /// pooled, HTTP/1.1 keep-alive (Dataverse affinity cookies are deliberately
    /// not stored). Redirects are not followed: the SDK reads them itself (S3's
    /// `PermanentRedirect`), and the Web API and Entra ID never redirect a call.
    pub fn https_client(&self) -> Result<reqwest::Client, reqwest::Error> {
        self.apply(reqwest::Client::builder())
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!("connect-dynamics/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    /// A `reqwest` builder that trusts these roots.
    fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        match self {
            // The configuration's verifier holds the roots behind an `Arc`: a
            // clone shares them.
            Self::BuiltIn(config) => builder.tls_backend_preconfigured(config.as_ref().clone()),
            Self::Platform => builder,
        }
    }
}

/// Mozilla's roots as trust anchors already in the form rustls checks against.
fn built_in_roots() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_store_holds_mozillas_roots() {
        assert!(
            built_in_roots().len() > 100,
            "Mozilla's store has well over 100 roots"
        );
        let roots = TlsRoots::built_in().expect("the roots");
        roots
            .https_client()
            .expect("reqwest takes the built-in roots");
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
