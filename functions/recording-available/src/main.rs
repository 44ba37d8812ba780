//! recording-available: S3 `Object Created` for recordings, chat transcripts and
//! Contact Lens files.

fn main() -> Result<(), lambda_runtime::Error> {
    shared::services::run(
        "recording-available",
        shared::services::lifecycle_from_env,
        shared::handlers::recording_available,
    )
}
