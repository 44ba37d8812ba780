//! Errors from the AWS services behind the stores (DynamoDB, SQS, S3).

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

#[derive(Debug, Clone, thiserror::Error)]
#[error("{service}: {message}")]
pub struct StoreError {
    pub service: &'static str,
    pub message: String,
    transient: bool,
}

impl StoreError {
    pub fn new(service: &'static str, message: impl Into<String>, transient: bool) -> Self {
        Self {
            service,
            message: message.into(),
            transient,
        }
    }

    /// Throttling, timeouts and 5xx can pass; a missing table or a bad request will not.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    pub fn from_sdk<E, R>(service: &'static str, error: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let transient = is_transient(&error);
        let message = aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string();
        Self::new(service, message, transient)
    }
}

/// Throttling, timeouts, 5xx and a connection that did not happen can pass; a
/// missing resource, a refused permission or a bad request will not.
pub fn is_transient<E, R>(error: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::ServiceError(service_error) => {
            let code = service_error.err().code().unwrap_or_default();
            code.contains("Throttl")
                || code.contains("ProvisionedThroughputExceeded")
                || code.contains("RequestLimitExceeded")
                || code.contains("TooManyRequests")
                || code.contains("InternalServerError")
                || code.contains("InternalServiceException")
                // Secrets Manager's name for its own 500.
                || code.contains("InternalServiceError")
                || code.contains("ServiceUnavailable")
                || code.contains("TransactionConflict")
        }
        SdkError::ConstructionFailure(_) => false,
        _ => true,
    }
}

/// True when a conditional write lost its condition.
pub fn is_condition_failure<E, R>(error: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
{
    error
        .as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "ConditionalCheckFailedException")
}
