//! The library every connect-dynamics function stands on.

pub mod auth;
pub mod config;
pub mod dataverse;
pub mod mapping;
pub mod phone;
pub mod secret;
pub mod template;
pub mod token_cache;
pub mod connect;
pub mod recording;
pub mod contact_state;
pub mod directory;
pub mod handoff;
pub mod store_error;
pub mod lifecycle;
pub mod observe;
pub mod handlers;
pub mod services;
