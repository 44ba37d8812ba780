//! AWS clients built the first time they are used.
//!
//! Building an SDK client parses that service's endpoint partition tables and
//! compiles their region patterns: a tenth of a millisecond or more each, paid at
//! every cold start. A function that may never call a service (the queues are
//! used only to hand an event off; S3 only for a configuration kept there and for
//! recordings) builds that client when it first needs it, once per container.

use std::fmt;
use std::sync::{Arc, OnceLock};

/// Clones share the one client.
pub struct OnDemand<C>(Arc<Lazy<C>>);

struct Lazy<C> {
    client: OnceLock<C>,
    build: Box<dyn Fn() -> C + Send + Sync>,
}

impl<C> OnDemand<C> {
    /// A client `build` makes on first use.
    pub fn new(build: impl Fn() -> C + Send + Sync + 'static) -> Self {
        Self(Arc::new(Lazy {
            client: OnceLock::new(),
            build: Box::new(build),
        }))
    }

    /// A client of the services `aws` configures, made by `build`
    /// (`aws_sdk_s3::Client::new`) on first use.
    pub fn aws(aws: &aws_config::SdkConfig, build: fn(&aws_config::SdkConfig) -> C) -> Self
    where
        C: 'static,
    {
        let aws = aws.clone();
        Self::new(move || build(&aws))
    }

    /// The client, built now if this is its first use.
    pub fn get(&self) -> &C {
        self.0.client.get_or_init(&self.0.build)
    }
}

/// A client already built, handed over as it is.
impl<C: Clone + Send + Sync + 'static> From<C> for OnDemand<C> {
    fn from(client: C) -> Self {
        Self::new(move || client.clone())
    }
}

impl<C> Clone for OnDemand<C> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<C> fmt::Debug for OnDemand<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnDemand")
            .field("built", &self.0.client.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_client_is_built_on_first_use_and_once_for_all_its_clones() {
        let builds = Arc::new(AtomicUsize::new(0));
        let counter = builds.clone();
        let client = OnDemand::new(move || counter.fetch_add(1, Ordering::SeqCst));
        assert_eq!(builds.load(Ordering::SeqCst), 0, "nothing built up front");
        assert_eq!(*client.get(), 0);
        assert_eq!(*client.clone().get(), 0, "a clone shares the client");
        assert_eq!(builds.load(Ordering::SeqCst), 1);
    }
}
