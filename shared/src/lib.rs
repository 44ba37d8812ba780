//! The library every connect-dynamics function stands on.

pub mod dataverse;
pub mod phone;
pub mod secret;
pub mod template;
pub mod mapping;
pub mod config;
