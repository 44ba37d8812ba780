//! Dynamics -> directory: the webhook, the sweep and the lookup, against the
//! emulator and moto_server.

use std::time::{Duration, Instant};

use e2e::{
    AwsResources, contacts_directory_yaml, deadline, directory_entries, directory_sync, emulator,
    fixture, seed_numbered_contacts,
};
use serde_json::{Value, json};
use shared::directory::best_match;
use shared::directory_sync::{DirectorySync, WebhookRequest};
use uuid::Uuid;

const KEY: &str = "webhook-key-for-tests";

fn webhook_body(message: &str, id: Uuid) -> Vec<u8> {
    let mut body = fixture(match message {
        "Create" => "dynamics-webhook-create.constructed.json",
        "Delete" => "dynamics-webhook-delete.constructed.json",
        _ => "dynamics-webhook-update.json",
    });
    body["PrimaryEntityId"] = json!(id.to_string());
    body.to_string().into_bytes()
}

async fn call(sync: &DirectorySync, code: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let answer = sync
        .record_saved(
            WebhookRequest {
                code: code.map(str::to_owned),
                header: None,
                body,
            },
            deadline(20),
        )
        .await;
    (answer.status, answer.body)
}

async fn lookup(sync: &DirectorySync, number: &str) -> Vec<shared::directory::Customer> {
    let e164 = sync.config.phones.normalize(number).unwrap();
    sync.directory.lookup(&e164).await.unwrap()
}

#[tokio::test]
async fn webhook_matrix() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let id = emulator.seed(
        "contacts",
        json!({"firstname": "Priya", "lastname": "Castellano", "telephone1": "07700 900555"}),
    );

    // Update: fetched by id, written, findable by phone.
    let (status, body) = call(&sync, Some(KEY), webhook_body("Update", id)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["result"]["outcome"], "applied", "{body}");
    let found = lookup(&sync, "+44 7700 900555").await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name.as_deref(), Some("Priya Castellano"));

    // Authentication: wrong, missing, empty and repeated keys are all 401.
    for code in [
        Some("wrong"),
        None,
        Some(""),
        Some("webhook-key-for-tests,webhook-key-for-tests"),
    ] {
        let (status, body) = call(&sync, code, webhook_body("Update", id)).await;
        assert_eq!(status, 401, "{code:?}");
        assert!(!body.to_string().contains("wrong"));
    }
    // Bad input: a clear 4xx, never a 500.
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"{not json".to_vec(), 400),
        (b"[]".to_vec(), 400),
        (json!({"MessageName": "Update", "PrimaryEntityName": "lead", "PrimaryEntityId": id.to_string()}).to_string().into_bytes(), 400),
        (json!({"MessageName": "Update", "PrimaryEntityName": "contact", "PrimaryEntityId": "abc"}).to_string().into_bytes(), 400),
        (json!({"MessageName": "Update", "PrimaryEntityName": "contact"}).to_string().into_bytes(), 400),
        (vec![b' '; 70_000], 413),
    ];
    for (body, expected) in cases {
        let (status, answer) = call(&sync, Some(KEY), body).await;
        assert_eq!(status, expected, "{answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Delete removes the entry and its phone rows.
    let (status, body) = call(&sync, Some(KEY), webhook_body("Delete", id)).await;
    assert_eq!(status, 200, "{body}");
    assert!(lookup(&sync, "07700 900555").await.is_empty());
    assert_eq!(directory_entries(&aws, "contact").await, 0);

    // A replayed Update after the Delete: the record is gone in Dynamics too, so the entry stays gone.
    emulator.remove("contacts", id);
    let (status, _) = call(&sync, Some(KEY), webhook_body("Update", id)).await;
    assert_eq!(status, 200);
    assert!(lookup(&sync, "07700 900555").await.is_empty());
}

#[tokio::test]
async fn out_of_order_webhooks_converge_and_older_never_overwrites_newer() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let mapping = sync.config.mapping_for("contact").unwrap().clone();
    let id = Uuid::new_v4();
    let entry = |number: &str, modified: &str| e2e::contact_entry(&sync, id, number, modified);
    use shared::directory::WriteOutcome;
    assert_eq!(
        sync.directory
            .put(&entry("+447700900001", "2026-11-20T10:00:02Z"), &mapping)
            .await
            .unwrap(),
        WriteOutcome::Written
    );
    // The older version arrives late: refused, and the newer number stays.
    assert_eq!(
        sync.directory
            .put(&entry("+447700900002", "2026-11-20T10:00:01Z"), &mapping)
            .await
            .unwrap(),
        WriteOutcome::Stale
    );
    assert_eq!(lookup(&sync, "+447700900001").await.len(), 1);
    assert!(lookup(&sync, "+447700900002").await.is_empty());
    // A newer one moves the number: the old phone row goes.
    assert_eq!(
        sync.directory
            .put(&entry("+447700900003", "2026-11-20T10:00:03Z"), &mapping)
            .await
            .unwrap(),
        WriteOutcome::Written
    );
    assert!(lookup(&sync, "+447700900001").await.is_empty());
    assert_eq!(lookup(&sync, "+447700900003").await.len(), 1);

    // Through the webhook: replays in any order end with what Dynamics holds now.
    let live = emulator.seed(
        "contacts",
        json!({"lastname": "Live", "telephone1": "+447700900777"}),
    );
    for message in ["Update", "Create", "Update", "Update"] {
        let (status, _) = call(&sync, Some(KEY), webhook_body(message, live)).await;
        assert_eq!(status, 200);
    }
    assert_eq!(lookup(&sync, "+447700900777").await.len(), 1);
}

#[tokio::test]
async fn throttled_fetch_is_accepted_and_completed_later() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let id = emulator.seed(
        "contacts",
        json!({"lastname": "Later", "telephone1": "+447700900888"}),
    );
    emulator.push_fault(dataverse_emulator::Fault::Throttle {
        retry_after_secs: 60,
    });
    let started = Instant::now();
    let (status, body) = call(&sync, Some(KEY), webhook_body("Update", id)).await;
    assert_eq!(status, 202, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(lookup(&sync, "+447700900888").await.is_empty());
    emulator.clear_faults();
    // The retry queue completes it.
    let messages = aws.drain(&aws.retry_queue).await;
    assert_eq!(messages.len(), 1);
    let records: Vec<Value> = messages
        .iter()
        .map(|m| json!({"messageId": m.message_id(), "body": m.body()}))
        .collect();
    shared::handlers::record_saved(&sync, json!({"Records": records}), deadline(20))
        .await
        .unwrap();
    assert_eq!(lookup(&sync, "+447700900888").await.len(), 1);
}

#[tokio::test]
async fn sweep_reconciles_changes_and_deletions_without_webhooks() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, &contacts_directory_yaml(200), KEY).await;
    let ids = seed_numbered_contacts(&emulator, 1000);
    let reports = sync.sweep(deadline(120)).await.unwrap();
    assert!(
        reports[0].finished && reports[0].full_reconciliation,
        "{reports:?}"
    );
    assert_eq!(reports[0].upserted, 1000);
    assert_eq!(directory_entries(&aws, "contact").await, 1000);

    let deleted: Vec<Uuid> = ids.iter().step_by(27).take(37).copied().collect();
    for id in &deleted {
        emulator.remove("contacts", *id);
    }
    let changed: Vec<(usize, Uuid)> = ids
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, id)| !deleted.contains(id))
        .step_by(19)
        .take(50)
        .collect();
    for (n, id) in &changed {
        emulator.modify(
            "contacts",
            *id,
            json!({"telephone1": format!("+4477119{n:05}")}),
        );
    }
    let reports = sync.sweep(deadline(120)).await.unwrap();
    let report = &reports[0];
    assert!(!report.full_reconciliation && report.finished, "{report:?}");
    assert_eq!((report.deleted, report.upserted), (37, 50), "{report:?}");
    assert_eq!(directory_entries(&aws, "contact").await, 963);
    for (n, _) in &changed {
        assert!(
            lookup(&sync, &format!("+4477009{n:05}")).await.is_empty(),
            "old number of {n} removed"
        );
        assert_eq!(
            lookup(&sync, &format!("+4477119{n:05}")).await.len(),
            1,
            "new number of {n}"
        );
    }

    // The change-tracking token expires; meanwhile 5 more records go, silently.
    emulator.expire_delta_tokens();
    let survivors: Vec<Uuid> = ids
        .iter()
        .filter(|id| !deleted.contains(id) && !changed.iter().any(|(_, c)| c == *id))
        .copied()
        .collect();
    for id in survivors.iter().take(5) {
        emulator.remove("contacts", *id);
    }
    let reports = sync.sweep(deadline(120)).await.unwrap();
    let report = &reports[0];
    assert!(report.full_reconciliation && report.finished, "{report:?}");
    assert_eq!(report.removed_unseen, 5, "{report:?}");
    assert_eq!(directory_entries(&aws, "contact").await, 958);
    for (n, _) in &changed {
        assert_eq!(lookup(&sync, &format!("+4477119{n:05}")).await.len(), 1);
    }
}

#[tokio::test]
async fn an_interrupted_sweep_finishes_over_several_runs_with_the_same_result() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, &contacts_directory_yaml(50), KEY).await;
    seed_numbered_contacts(&emulator, 400);
    // Each run gets a sliver of time past the sweep's reserve: a page or two.
    let mut runs = 0;
    loop {
        runs += 1;
        let reports = sync
            .sweep(Instant::now() + Duration::from_millis(3_300))
            .await
            .unwrap();
        if reports[0].finished {
            break;
        }
        assert!(runs < 200, "the sweep must progress");
    }
    println!("interrupted sweep finished after {runs} runs");
    assert!(runs > 1, "the deadline was meant to interrupt the sweep");
    assert_eq!(directory_entries(&aws, "contact").await, 400);
    for n in (0..400).step_by(37) {
        assert_eq!(lookup(&sync, &format!("+4477009{n:05}")).await.len(), 1);
    }
}

#[tokio::test]
async fn the_same_number_in_any_format_finds_the_same_entry_and_ties_follow_the_rule() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let contact = emulator.seed(
        "contacts",
        json!({"firstname": "Maren", "lastname": "Holt", "mobilephone": "+44 7700 900123"}),
    );
    let account = emulator.seed(
        "accounts",
        json!({"name": "Holt Dental", "telephone1": "07700900123"}),
    );
    sync.sweep(deadline(60)).await.unwrap();
    for number in [
        "+447700900123",
        "07700 900123",
        "0044 7700 900 123",
        "(07700) 900-123",
    ] {
        let found = lookup(&sync, number).await;
        assert_eq!(found.len(), 2, "{number}");
        let best = best_match(found).unwrap();
        assert_eq!(
            (best.entity.as_str(), best.id),
            ("contact", contact),
            "contacts (priority 1) win over accounts"
        );
    }
    let _ = account;
}

/// record-saved reading its webhook key from Secrets Manager (moto_server), the
/// client pointed at `endpoint`.
async fn sync_with_stored_key(
    emulator: &dataverse_emulator::Emulator,
    aws: &AwsResources,
    secret_id: &str,
    endpoint: &str,
) -> DirectorySync {
    let mut sync = directory_sync(emulator, aws, "", KEY).await;
    let yaml = format!(
        "{}webhook:\n  key: {{ secrets_manager: {secret_id} }}\n",
        e2e::config_yaml(emulator)
    );
    sync.config = std::sync::Arc::new(shared::config::Config::from_yaml(&yaml).unwrap());
    sync.keys = tokio::sync::OnceCell::new();
    let secrets = aws_sdk_secretsmanager::config::Builder::from(&aws.sdk)
        .endpoint_url(endpoint)
        .build();
    sync.secrets = Some(aws_sdk_secretsmanager::Client::from_conf(secrets).into());
    sync
}

#[tokio::test]
async fn a_webhook_key_store_out_of_reach_asks_dynamics_to_retry_instead_of_refusing() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let secret_id = format!("webhook-key-{}", Uuid::new_v4());
    aws_sdk_secretsmanager::Client::new(&aws.sdk)
        .create_secret()
        .name(&secret_id)
        .secret_string(KEY)
        .send()
        .await
        .unwrap();
    let id = emulator.seed(
        "contacts",
        json!({"firstname": "Ines", "lastname": "Duarte", "telephone1": "07700 900321"}),
    );

    // Secrets Manager unreachable: the key cannot be checked, which is not the
    // caller's fault. 503 is the one answer Dynamics tries again (401 is final).
    let unreachable = sync_with_stored_key(&emulator, &aws, &secret_id, "http://127.0.0.1:9").await;
    let (status, body) = call(&unreachable, Some(KEY), webhook_body("Update", id)).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        !body.to_string().contains(KEY),
        "the answer never shows the key: {body}"
    );

    // Reachable: the stored key is read and the same call is applied.
    let reachable = sync_with_stored_key(&emulator, &aws, &secret_id, &e2e::aws_endpoint()).await;
    let (status, body) = call(&reachable, Some(KEY), webhook_body("Update", id)).await;
    assert_eq!(status, 200, "{body}");
    // A wrong key is still refused for good.
    let (status, _) = call(&reachable, Some("not-the-key"), webhook_body("Update", id)).await;
    assert_eq!(status, 401);

    // A secret that does not exist is a deployment mistake, not a passing failure.
    let missing =
        sync_with_stored_key(&emulator, &aws, "no-such-secret", &e2e::aws_endpoint()).await;
    let (status, _) = call(&missing, Some(KEY), webhook_body("Update", id)).await;
    assert_eq!(status, 401);
}
