//! Every end-to-end test in one binary: the deployed handlers and clients against
//! the Dataverse emulator and moto_server on loopback. One binary links the AWS SDK
//! once instead of once per file. Run one group with
//! `cargo test -p e2e --test suite -- lifecycle::`.

mod dataverse_client;
mod directory;
mod drift;
mod lifecycle;
mod resilience;
mod setup;
mod template;
mod token_cache;
