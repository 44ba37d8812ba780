//! contact-ended: the `DISCONNECTED` contact event (end time, duration, close).

fn main() -> Result<(), lambda_runtime::Error> {
    shared::services::run(
        "contact-ended",
        shared::services::lifecycle_from_env,
        shared::handlers::contact_event,
    )
}
