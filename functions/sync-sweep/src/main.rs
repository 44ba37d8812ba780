//! sync-sweep: the schedule that reconciles the caller directory with Dataverse
//! change tracking (deletions above all).

fn main() -> Result<(), lambda_runtime::Error> {
    shared::services::run(
        "sync-sweep",
        shared::services::directory_sync_from_env,
        shared::handlers::sync_sweep,
    )
}
