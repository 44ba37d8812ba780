//! The library every connect-dynamics function stands on.

pub mod agents;
pub mod auth;
pub mod aws_http;
pub mod config;
pub mod connect;
pub mod connect_users;
pub mod contact_state;
pub mod dataverse;
pub mod directory;
pub mod directory_sync;
pub mod handlers;
pub mod handoff;
pub mod lifecycle;
pub mod mapping;
pub mod observe;
pub mod phone;
pub mod recording;
pub mod schema_check;
pub mod secret;
pub mod services;
pub mod setup;
pub mod store_error;
pub mod template;
pub mod tls;
pub mod token_cache;
pub mod webhook;
