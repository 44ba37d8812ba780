//! contact-answered: the `CONNECTED_TO_AGENT` contact event.

fn main() -> Result<(), lambda_runtime::Error> {
    shared::services::run(
        "contact-answered",
        shared::services::lifecycle_from_env,
        shared::handlers::contact_event,
    )
}
