//! record-saved: the Dynamics webhook (Create, Update, Delete) through a Lambda
//! function URL, and its retry queue.

fn main() -> Result<(), lambda_runtime::Error> {
    shared::services::run(
        "record-saved",
        shared::services::directory_sync_from_env,
        shared::handlers::record_saved,
    )
}
