//! contact-created: the contact flow's "Invoke AWS Lambda function" block (answered
//! with the record id and screen-pop URL), the `INITIATED` contact event, and the
//! retry queue.

fn main() -> Result<(), lambda_runtime::Error> {
    shared::services::run(
        "contact-created",
        shared::services::lifecycle_from_env,
        shared::handlers::contact_created,
    )
}
