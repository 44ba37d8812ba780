//! The Dataverse Web API client.

pub mod odata;
pub mod retry;
