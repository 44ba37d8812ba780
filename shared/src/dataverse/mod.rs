//! The Dataverse Web API client.

pub mod batch;
pub mod client;
pub mod error;
pub mod odata;
pub mod retry;

pub use client::{Change, DataverseClient, DeltaPage, Page, Query};
pub use error::DataverseError;
