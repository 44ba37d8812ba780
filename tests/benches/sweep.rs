//! Benchmark (not a test): a full reconciliation of 100,000 records and a delta
//! sweep of 1,000 changes, against the emulator and moto_server.
//!
//! Run: `bash tests/bench [records] [--memory]` (starts moto_server). With `--memory`
//! the directory and checkpoints are the in-memory stores: the code's own cost, with
//! write units counted from the items written (moto_server is far slower than DynamoDB).

use std::time::{Duration, Instant};

use e2e::{AwsResources, directory_entries, directory_sync, emulator};
use serde_json::json;

fn peak_rss_mib() -> f64 {
    e2e::bench::peak_rss_mib(std::process::id())
}

#[tokio::main]
async fn main() {
    let records: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let in_memory = std::env::args().any(|a| a == "--memory");
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let yaml = "directory:\n  sweep_page_size: 5000\n  entities:\n    - { entity_set: contacts, logical_name: contact, key: contactid, name: fullname, phones: [telephone1, mobilephone] }\n";
    let mut sync = directory_sync(&emulator, &aws, yaml, "bench").await;
    if in_memory {
        sync.directory = std::sync::Arc::new(shared::directory::CallerDirectory::memory());
        sync.checkpoints = shared::directory_sync::CheckpointStore::memory();
    }
    let ids: Vec<uuid::Uuid> = (0..records)
        .map(|n| {
            emulator.seed(
                "contacts",
                json!({"firstname": "Caller", "lastname": format!("{n}"), "telephone1": format!("+44770{n:07}"), "mobilephone": format!("+44771{n:07}")}),
            )
        })
        .collect();
    let rss_before = peak_rss_mib();

    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for (label, prepare) in [
        ("full reconciliation", None),
        ("delta, 1,000 changes", Some(1000usize)),
    ] {
        if let Some(changes) = prepare {
            for (n, id) in ids
                .iter()
                .step_by(records / changes)
                .take(changes)
                .enumerate()
            {
                emulator.modify(
                    "contacts",
                    *id,
                    json!({"telephone1": format!("+44772{n:07}")}),
                );
            }
        }
        emulator.clear_requests();
        let dynamodb_before = aws.dynamodb_requests.count();
        let started = Instant::now();
        let reports = sync
            .sweep(Instant::now() + Duration::from_secs(3600))
            .await
            .expect("sweep");
        let elapsed = started.elapsed();
        let report = &reports[0];
        assert!(report.finished, "{report:?}");
        // Each written item is under 1 KB: one write unit per item (entry + one per phone).
        let write_units = report.upserted * 3;
        runs.push(json!({
            "run": label,
            "records_applied": report.upserted,
            "wall_seconds": elapsed.as_secs_f64(),
            "dataverse_requests": emulator.requests().len(),
            "dynamodb_requests": aws.dynamodb_requests.count() - dynamodb_before,
            "dynamodb_write_units": write_units,
            "peak_rss_mib": peak_rss_mib(),
        }));
        rows.push(format!(
            "| {label} | {} | {:.1} s | {} | {} | ~{write_units} | {:.0} MiB |",
            report.upserted,
            elapsed.as_secs_f64(),
            emulator.requests().len(),
            aws.dynamodb_requests.count() - dynamodb_before,
            peak_rss_mib(),
        ));
    }
    if !in_memory {
        assert_eq!(directory_entries(&aws, "contact").await, records);
    }
    let store = if in_memory {
        "in-memory directory"
    } else {
        "DynamoDB in moto_server"
    };
    println!(
        "\nSweep benchmark: {records} contacts, page size 5000, {store} (peak RSS includes the in-process emulator: {rss_before:.0} MiB before the sweep)\n"
    );
    println!(
        "| run | records applied | wall time | Dataverse requests | DynamoDB requests | DynamoDB write units | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    let document =
        json!({"records": records, "store": store, "emulator_rss_mib": rss_before, "runs": runs});
    e2e::bench::write_json(
        if in_memory {
            "sweep-memory.json"
        } else {
            "sweep.json"
        },
        &document,
    );
}
