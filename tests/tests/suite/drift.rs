//! Dynamics and AWS drifting the way they really do: a customer deleted before the
//! directory hears of it, owners Dataverse will not assign, webhooks during a paused
//! reconciliation. Degrade, don't drop: the call is always logged, a live customer
//! always recognised, and what was left out is said.

use std::time::{Duration, Instant};

use dataverse_emulator::{Fault, Kind};
use e2e::contact::{deliver, owner_lifecycle, phonecalls, sample_agent_is, scenario};
use e2e::{
    AwsResources, contacts_directory_yaml, deadline, directory_entries, directory_sync,
    drain_retries, emulator, numbered_phone, seed_numbered_contacts,
};
use e2e::{contact_entry, fixture, lifecycle};
use serde_json::{Map, Value, json};
use shared::directory_sync::{DirectorySync, WebhookRequest};
use uuid::Uuid;

const KEY: &str = "webhook-key-for-tests";

/// Runs every event of a fresh contact in order; returns the flow's answer.
async fn run_contact(lifecycle: &shared::lifecycle::Lifecycle, aws: &AwsResources) -> Value {
    e2e::contact::run_contact(lifecycle, aws).await.0
}

/// The record holds every step's columns and is closed.
fn assert_complete(record: &Map<String, Value>) {
    assert_eq!(record["phonenumber"], "+447700900123", "{record:?}");
    assert_eq!(record["actualstart"], "2025-03-11T09:41:06Z", "{record:?}");
    assert_eq!(record["actualend"], "2025-03-11T13:26:48Z", "{record:?}");
    let description = record["description"].as_str().unwrap_or_default();
    assert!(description.contains("Chat transcript:"), "{description}");
    assert_eq!(
        (&record["statecode"], &record["statuscode"]),
        (&json!(1), &json!(4))
    );
}

/// Writes Dataverse refused with `status`.
fn refusals(emulator: &dataverse_emulator::Emulator, status: u16) -> usize {
    emulator
        .requests()
        .iter()
        .filter(|r| r.method != "GET" && r.status == status)
        .count()
}

#[tokio::test]
async fn a_customer_deleted_before_the_directory_heard_costs_the_link_not_the_record() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let customer = emulator.seed(
        "contacts",
        json!({"firstname": "Maren", "lastname": "Holt", "mobilephone": "07700 900123"}),
    );
    sync.sweep(deadline(30)).await.unwrap();
    // Deleted in Dynamics; no webhook, no sweep since.
    assert!(emulator.remove("contacts", customer));

    let answer = run_contact(&lifecycle, &aws).await;
    assert_eq!(answer["dynamics_status"], "created", "{answer}");
    assert_eq!(answer["dynamics_customer_matched"], "false", "{answer}");
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1, "one record");
    assert_complete(&records[0]);
    assert!(records[0].get("_regardingobjectid_value").is_none());
    let letters = aws.dead_letters().await;
    assert!(letters.is_empty(), "no dead letters: {letters:?}");
    assert_eq!(refusals(&emulator, 404), 1, "one refused write");
    // The stale entry is gone: the next call from the number matches no one and is not refused.
    assert_eq!(directory_entries(&aws, "contact").await, 0);
    let answer = run_contact(&lifecycle, &aws).await;
    assert_eq!(answer["dynamics_customer_matched"], "false");
    assert_eq!(
        refusals(&emulator, 404),
        1,
        "the second call is not refused"
    );
    assert_eq!(phonecalls(&emulator).len(), 2);
    println!(
        "stale customer: {} records, {} dead letters, {} refused writes",
        phonecalls(&emulator).len(),
        letters.len(),
        refusals(&emulator, 404)
    );
}

#[tokio::test]
async fn a_deleted_customer_bound_as_an_activity_party_costs_only_the_party() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(
        &emulator,
        &aws,
        "contact:\n  bind_customer_as: activity_party\n",
    );
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let customer = emulator.seed(
        "contacts",
        json!({"lastname": "Holt", "mobilephone": "+447700900123"}),
    );
    sync.sweep(deadline(30)).await.unwrap();
    emulator.remove("contacts", customer);
    let answer = run_contact(&lifecycle, &aws).await;
    assert_eq!(answer["dynamics_status"], "created", "{answer}");
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1);
    assert_complete(&records[0]);
    assert!(records[0].get("phonecall_activity_parties").is_none());
    assert!(aws.dead_letters().await.is_empty());
}

/// The sample agent, known to Connect as ana.silva, and a Dynamics user with the
/// same email and `columns`; the user's id.
fn agent_with_dynamics_user(emulator: &dataverse_emulator::Emulator, columns: Value) -> Uuid {
    sample_agent_is(emulator, "ana.silva", Some("ana.silva@example.com"));
    let mut user =
        json!({"fullname": "Ana Silva", "internalemailaddress": "ana.silva@example.com"});
    if let (Some(user), Value::Object(columns)) = (user.as_object_mut(), columns) {
        user.extend(columns);
    }
    emulator.seed("systemusers", user)
}

#[tokio::test]
async fn an_owner_without_a_security_role_costs_the_owner_not_the_record() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let owner = agent_with_dynamics_user(&emulator, json!({}));
    emulator.remove_security_roles(owner);
    let lifecycle = owner_lifecycle(&emulator, &aws, "internalemailaddress");
    run_contact(&lifecycle, &aws).await;
    run_contact(&lifecycle, &aws).await;
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 2);
    for record in &records {
        assert_complete(record);
        assert!(record.get("_ownerid_value").is_none(), "{record:?}");
        let description = record["description"].as_str().unwrap_or_default();
        assert!(description.contains("ana.silva"), "{description}");
    }
    assert!(aws.dead_letters().await.is_empty());
    assert_eq!(
        refusals(&emulator, 403),
        1,
        "the refused owner is remembered as no owner"
    );
}

#[tokio::test]
async fn a_disabled_user_is_never_made_the_owner() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    agent_with_dynamics_user(&emulator, json!({"isdisabled": true}));
    let lifecycle = owner_lifecycle(&emulator, &aws, "internalemailaddress");
    run_contact(&lifecycle, &aws).await;
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1);
    assert_complete(&records[0]);
    assert!(records[0].get("_ownerid_value").is_none());
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn a_write_refused_after_the_reopen_leaves_the_record_closed() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    let (events, recording) = scenario.events.split_at(4);
    for (kind, event) in events {
        deliver(&lifecycle, *kind, event.clone()).await;
    }
    // No file within the grace: the delayed close closes the record alone.
    drain_retries(&lifecycle, &aws).await;
    assert_eq!(phonecalls(&emulator)[0]["statecode"], 1, "closed");
    // The late recording: the reopen passes, the write after it is refused.
    emulator.push_fault(Fault::Delay(Duration::ZERO));
    emulator.push_fault(Fault::Status(400));
    let (kind, event) = recording[0].clone();
    deliver(&lifecycle, kind, event).await;
    let record = &phonecalls(&emulator)[0];
    assert_eq!(
        (&record["statecode"], &record["statuscode"]),
        (&json!(1), &json!(4)),
        "closed again"
    );
    let letters = aws.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("closed again"), "{reason}");
}

fn webhook(id: Uuid) -> WebhookRequest {
    let mut body = fixture("dynamics-webhook-update.json");
    body["PrimaryEntityId"] = json!(id.to_string());
    WebhookRequest {
        code: Some(KEY.to_owned()),
        header: None,
        body: body.to_string().into_bytes(),
    }
}

async fn matches(sync: &DirectorySync, number: &str) -> usize {
    let e164 = sync.config.phones.normalize(number).unwrap();
    sync.directory.lookup(&e164).await.unwrap().len()
}

/// A full pass that reads one page, then meets Dynamics failing until the run
/// gives up: paused at its checkpoint.
async fn pause_after_one_page(emulator: &dataverse_emulator::Emulator, sync: &DirectorySync) {
    emulator.push_fault(Fault::Delay(Duration::ZERO));
    for _ in 0..40 {
        emulator.push_fault(Fault::Status(503));
    }
    let first = sync
        .sweep(Instant::now() + Duration::from_secs(8))
        .await
        .unwrap();
    assert!(!first[0].finished, "{first:?}");
    emulator.clear_faults();
}

#[tokio::test]
async fn webhooks_during_a_paused_reconciliation_are_kept_when_it_completes() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, &contacts_directory_yaml(50), KEY).await;
    let ids = seed_numbered_contacts(&emulator, 200);
    pause_after_one_page(&emulator, &sync).await;
    // Meanwhile: a record the pass has read is renumbered, a new one is created,
    // each told by a webhook (and one webhook again, as a retry would).
    let read: Vec<(usize, Uuid)> = {
        let mut read = Vec::new();
        for (n, id) in ids.iter().enumerate() {
            if matches(&sync, &numbered_phone(n)).await == 1 {
                read.push((n, *id));
            }
        }
        read
    };
    assert!(
        !read.is_empty() && read.len() < 200,
        "paused part way: {} read",
        read.len()
    );
    let (renumbered_n, renumbered) = read[0];
    emulator.modify(
        "contacts",
        renumbered,
        json!({"telephone1": "+447711900001"}),
    );
    let created = emulator.seed(
        "contacts",
        json!({"lastname": "New", "telephone1": "+447711900002"}),
    );
    // And some the pass has not reached go without a word.
    let deleted: Vec<Uuid> = ids
        .iter()
        .filter(|id| !read.iter().any(|(_, r)| r == *id))
        .take(3)
        .copied()
        .collect();
    for id in &deleted {
        emulator.remove("contacts", *id);
    }
    for id in [renumbered, created, renumbered] {
        let answer = sync.record_saved(webhook(id), deadline(20)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let mut runs = 0;
    loop {
        runs += 1;
        let reports = sync.sweep(deadline(60)).await.unwrap();
        if reports[0].finished {
            break;
        }
        assert!(runs < 5, "the pass completes: {reports:?}");
    }

    assert_eq!(matches(&sync, "+447711900001").await, 1, "renumbered kept");
    assert_eq!(matches(&sync, "+447711900002").await, 1, "created kept");
    assert_eq!(
        matches(&sync, &numbered_phone(renumbered_n)).await,
        0,
        "old number gone"
    );
    let mut missing = 0;
    for (n, id) in ids.iter().enumerate() {
        let expected = usize::from(!deleted.contains(id) && *id != renumbered);
        if matches(&sync, &numbered_phone(n)).await != expected {
            missing += 1;
        }
    }
    assert_eq!(missing, 0, "every live row matches, no deleted one does");
    assert_eq!(directory_entries(&aws, "contact").await, 198);
    println!(
        "paused pass: {} read before the pause, {missing} live entries missing",
        read.len()
    );
}

/// The emulator's client secret, stored in Secrets Manager (moto_server) under a
/// fresh id.
async fn store_client_secret(
    emulator: &dataverse_emulator::Emulator,
    aws: &AwsResources,
) -> String {
    let secret_id = format!("dynamics-client-secret-{}", Uuid::new_v4().simple());
    aws_sdk_secretsmanager::Client::new(&aws.sdk)
        .create_secret()
        .name(&secret_id)
        .secret_string(emulator.options().client_secret.as_str())
        .send()
        .await
        .unwrap();
    secret_id
}

#[tokio::test]
async fn a_secret_rotated_while_containers_are_warm_is_not_an_outage() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let secrets = aws_sdk_secretsmanager::Client::new(&aws.sdk);
    let secret_id = store_client_secret(&emulator, &aws).await;
    let lifecycle = e2e::lifecycle_with_stored_secret(&emulator, &aws, &secret_id);
    run_contact(&lifecycle, &aws).await;

    // Rotated: the new value in Secrets Manager, the old one refused, the old tokens gone.
    secrets
        .put_secret_value()
        .secret_id(&secret_id)
        .secret_string("rotated-client-secret")
        .send()
        .await
        .unwrap();
    emulator.rotate_client_secret("rotated-client-secret");
    emulator.expire_tokens();
    let answer = run_contact(&lifecycle, &aws).await;
    assert_eq!(answer["dynamics_status"], "created", "{answer}");
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 2, "every contact has its record");
    for record in &records {
        assert_complete(record);
    }
    let letters = aws.dead_letters().await;
    assert!(letters.is_empty(), "no dead letters: {letters:?}");
    println!(
        "rotation: {} records, {} dead letters, {} token requests",
        records.len(),
        letters.len(),
        emulator.token_requests()
    );
}

#[tokio::test]
async fn a_secret_store_out_of_reach_at_a_token_refresh_is_retried_not_dead_lettered() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let secret_id = store_client_secret(&emulator, &aws).await;
    // No token cached yet, and Secrets Manager refuses connections.
    let cut_off = e2e::lifecycle_with_secret_at(&emulator, &aws, &secret_id, "http://127.0.0.1:9");
    let answer = flow_with_a_hanging_dependency(&emulator, &aws, &cut_off).await;
    assert!(
        aws.dead_letters().await.is_empty(),
        "a passing outage is not a reason to give up"
    );
    // Secrets Manager back: the retry queue makes the record.
    drain_retries(
        &e2e::lifecycle_with_stored_secret(&emulator, &aws, &secret_id),
        &aws,
    )
    .await;
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1, "the record appears");
    assert_eq!(records[0]["activityid"], answer["dynamics_record_id"]);
    assert!(aws.dead_letters().await.is_empty());
}

/// The flow's answer within budget + 1 s, whatever hangs; then, with the dependency
/// back, the retry queue makes the record.
async fn flow_with_a_hanging_dependency(
    emulator: &dataverse_emulator::Emulator,
    aws: &AwsResources,
    lifecycle: &shared::lifecycle::Lifecycle,
) -> Value {
    let scenario = scenario(aws).await;
    let (_, flow_event) = scenario.events[0].clone();
    let started = Instant::now();
    let flow = shared::handlers::contact_created(lifecycle, flow_event, deadline(8));
    let answer = tokio::time::timeout(Duration::from_secs(10), flow)
        .await
        .expect("the flow answers before its Lambda times out")
        .expect("the flow gets an answer");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(4),
        "answered after {elapsed:?}: {answer}"
    );
    assert_eq!(answer["dynamics_status"], "pending", "{answer}");
    assert!(answer["dynamics_record_id"].is_string());
    assert!(phonecalls(emulator).is_empty(), "not yet written");
    answer
}

#[tokio::test]
async fn a_black_holed_dynamodb_request_costs_the_flow_its_budget_and_nothing_else() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    // The flow's first request (the contact's lock in DynamoDB) never gets an answer.
    let proxy =
        e2e::crash_proxy::CrashProxy::start(emulator.org_url(), e2e::aws_endpoint(), Some(1)).await;
    let via = aws.through(proxy.url());
    let held = e2e::lifecycle_via(&emulator, proxy.url(), &via, "");
    let answer = flow_with_a_hanging_dependency(&emulator, &aws, &held).await;
    // The held request took the lock; it runs out, then the retry makes the record.
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    drain_retries(&lifecycle(&emulator, &aws, ""), &aws).await;
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1, "the record appears");
    assert_eq!(records[0]["activityid"], answer["dynamics_record_id"]);
    assert_eq!(records[0]["phonenumber"], "+447700900123");
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn a_slow_token_endpoint_costs_the_flow_its_budget_and_nothing_else() {
    let emulator = e2e::emulator_with(dataverse_emulator::EmulatorOptions {
        token_latency: Duration::from_secs(6),
        ..Default::default()
    })
    .await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let answer = flow_with_a_hanging_dependency(&emulator, &aws, &lifecycle).await;
    drain_retries(&lifecycle, &aws).await;
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1, "the record appears");
    assert_eq!(records[0]["activityid"], answer["dynamics_record_id"]);
    assert!(aws.dead_letters().await.is_empty());
}

/// The contact's state item as DynamoDB holds it.
async fn state_item(
    aws: &AwsResources,
    contact_id: &str,
) -> std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue> {
    aws.dynamodb
        .get_item()
        .table_name(&aws.state_table)
        .key(
            "contact_id",
            aws_sdk_dynamodb::types::AttributeValue::S(contact_id.to_owned()),
        )
        .send()
        .await
        .unwrap()
        .item
        .unwrap_or_default()
}

/// The size of the contact's state document.
async fn state_item_bytes(aws: &AwsResources, contact_id: &str) -> usize {
    state_item(aws, contact_id)
        .await
        .get("state")
        .and_then(|v| v.as_s().ok())
        .map_or(0, String::len)
}

/// The scenario's chat transcript file holds `lines`.
async fn chat_transcript_is(
    aws: &AwsResources,
    scenario: &e2e::contact::Scenario,
    lines: Vec<Value>,
) {
    let (_, recording) = &scenario.events[4];
    let key = recording["detail"]["object"]["key"].as_str().unwrap();
    aws.s3
        .put_object()
        .bucket(&aws.bucket)
        .key(key)
        .body(json!({"Transcript": lines}).to_string().into_bytes().into())
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_long_chat_transcript_never_outgrows_the_contact_state() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    // About 600 KB of chat (under the 1 MB transcript limit), as a long chat gives.
    let lines: Vec<Value> = (0..6000)
        .map(|n| json!({"Content": format!("message {n:05} {}", "x".repeat(80)), "ParticipantRole": "CUSTOMER", "DisplayName": "Nadia"}))
        .collect();
    chat_transcript_is(&aws, &scenario, lines).await;
    for (kind, event) in scenario.events.clone() {
        deliver(&lifecycle, kind, event).await;
    }
    assert_eq!(drain_retries(&lifecycle, &aws).await, 0, "nothing deferred");
    assert!(aws.dead_letters().await.is_empty());
    let notes = e2e::contact::notes(&emulator);
    assert_eq!(notes.len(), 1);
    assert_eq!(
        notes[0].chars().count(),
        100_000,
        "the note holds what notetext can"
    );
    let state = state_item_bytes(&aws, &scenario.contact_id).await;
    assert!(
        state < 20_000,
        "the state keeps no transcript text: {state} bytes"
    );
}

#[tokio::test]
async fn a_refused_next_page_link_restarts_the_full_read_instead_of_sticking() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, &contacts_directory_yaml(50), KEY).await;
    seed_numbered_contacts(&emulator, 120);
    pause_after_one_page(&emulator, &sync).await;
    // The saved next-page link is refused when the pass resumes.
    emulator.push_fault(Fault::Status(400));
    let second = sync
        .sweep(deadline(60))
        .await
        .expect("the pass starts over");
    assert!(
        second[0].finished && second[0].full_reconciliation,
        "{second:?}"
    );
    assert_eq!(directory_entries(&aws, "contact").await, 120);
}

#[tokio::test]
async fn an_entity_that_keeps_failing_does_not_stop_the_others() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let yaml = "directory:\n  entities:\n    - { entity_set: accounts, logical_name: account, key: accountid, name: name, phones: [telephone1] }\n    - { entity_set: contacts, logical_name: contact, key: contactid, name: fullname, phones: [telephone1] }\n";
    let sync = directory_sync(&emulator, &aws, yaml, KEY).await;
    emulator.set_change_tracking("accounts", false);
    emulator.seed(
        "contacts",
        json!({"lastname": "Holt", "telephone1": "+447700900123"}),
    );
    let failed = sync
        .sweep(deadline(60))
        .await
        .expect_err("the failing entity is reported");
    assert_eq!(failed.reports.len(), 2, "{failed}");
    assert!(failed.reports[0].error.is_some(), "{failed}");
    assert!(failed.reports[1].finished && failed.reports[1].error.is_none());
    assert!(failed.to_string().contains("account"), "{failed}");
    assert_eq!(
        directory_entries(&aws, "contact").await,
        1,
        "contacts still swept"
    );
}

/// Runs `write` against the directory through a proxy that holds the answer to
/// request `k` forever (its effect happens: the process stopped right after it).
/// False when the write needed fewer than `k` requests.
async fn stopped_at<F, Fut>(k: usize, aws: &AwsResources, write: F) -> bool
where
    F: FnOnce(shared::directory::CallerDirectory) -> Fut,
    Fut: std::future::Future,
{
    let proxy =
        e2e::crash_proxy::CrashProxy::start(String::new(), e2e::aws_endpoint(), Some(k)).await;
    let via = aws.through(proxy.url());
    let directory =
        shared::directory::CallerDirectory::dynamodb(via.dynamodb, &aws.directory_table);
    let finished = tokio::time::timeout(Duration::from_secs(3), write(directory)).await;
    finished.is_err()
}

/// DynamoDB left a sweep page's batch read or write unprocessed after every retry:
/// an error the sweep pauses on, never a page taken for written or keys for absent.
#[tokio::test]
async fn a_batch_dynamodb_leaves_unprocessed_is_an_error_not_a_silent_loss() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let mapping = sync.config.mapping_for("contact").unwrap().clone();
    let id = Uuid::new_v4();
    let before = contact_entry(&sync, id, "+447711955601", "2026-11-20T10:00:01Z");
    sync.directory.put(&before, &mapping).await.unwrap();
    let after = contact_entry(&sync, id, "+447711955602", "2026-11-20T10:00:02Z");
    let page_through = |operation: &'static str| {
        let (aws, after, mapping) = (&aws, after.clone(), mapping.clone());
        async move {
            let proxy =
                e2e::crash_proxy::CrashProxy::leaving_unprocessed(e2e::aws_endpoint(), operation)
                    .await;
            let via = aws.through(proxy.url());
            let directory =
                shared::directory::CallerDirectory::dynamodb(via.dynamodb, &aws.directory_table);
            // Bounded: retrying the unprocessed part forever is the other way to lose it.
            let written = tokio::time::timeout(
                Duration::from_secs(60),
                directory.put_page(&[after], &mapping, 1),
            )
            .await
            .unwrap_or_else(|_| panic!("{operation}: gave up within a minute"));
            (written, proxy.unprocessed_answers())
        }
    };
    let ((read, reads), (write, writes)) =
        tokio::join!(page_through("BatchGetItem"), page_through("BatchWriteItem"));
    for (written, operation, tries) in [(read, "read", reads), (write, "write", writes)] {
        let error = written.expect_err(operation);
        assert!(error.is_transient(), "{operation}: {error}");
        assert!(
            error.to_string().contains("unprocessed"),
            "{operation}: {error}"
        );
        assert_eq!(tries, 9, "{operation}: the first try and 8 retries");
    }
    // Nothing was half written: the entry still has its old number only.
    assert_eq!(matches(&sync, "+447711955601").await, 1);
    assert_eq!(matches(&sync, "+447711955602").await, 0);
}

#[tokio::test]
async fn a_directory_write_stopped_at_any_request_is_finished_by_its_retry() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let mapping = sync.config.mapping_for("contact").unwrap().clone();
    let mut boundaries = 0;
    for k in 1.. {
        // A renumbering (old → new) stopped after its k-th request, then retried.
        let id = Uuid::new_v4();
        let (old, new) = (format!("+4477119{k:05}"), format!("+4477118{k:05}"));
        let before = contact_entry(&sync, id, &old, "2026-11-20T10:00:01Z");
        sync.directory.put(&before, &mapping).await.unwrap();
        let after = contact_entry(&sync, id, &new, "2026-11-20T10:00:02Z");
        let stopped = stopped_at(k, &aws, |directory| {
            let (after, mapping) = (after.clone(), mapping.clone());
            async move { directory.put(&after, &mapping).await }
        })
        .await;
        if !stopped {
            break;
        }
        boundaries += 1;
        sync.directory.put(&after, &mapping).await.unwrap();
        assert_eq!(
            matches(&sync, &old).await,
            0,
            "put stopped at request {k}: old number gone"
        );
        assert_eq!(matches(&sync, &new).await, 1, "put stopped at request {k}");
    }
    assert!(boundaries >= 3, "the put has its requests: {boundaries}");
    let mut remove_boundaries = 0;
    for k in 1.. {
        let id = Uuid::new_v4();
        let number = format!("+4477117{k:05}");
        let entry = contact_entry(&sync, id, &number, "2026-11-20T10:00:01Z");
        sync.directory.put(&entry, &mapping).await.unwrap();
        let stopped = stopped_at(k, &aws, |directory| async move {
            directory.remove("contact", id).await
        })
        .await;
        if !stopped {
            break;
        }
        remove_boundaries += 1;
        sync.directory.remove("contact", id).await.unwrap();
        assert_eq!(
            matches(&sync, &number).await,
            0,
            "remove stopped at request {k}"
        );
    }
    assert!(remove_boundaries >= 2, "the remove has its requests");
    println!(
        "directory writes stopped at each of {boundaries} put and {remove_boundaries} remove requests: retried, consistent"
    );
}

#[tokio::test]
async fn concurrent_webhooks_of_one_record_leave_only_the_newest_numbers() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let mapping = sync.config.mapping_for("contact").unwrap().clone();
    for round in 0..5 {
        let id = Uuid::new_v4();
        let versions: Vec<_> = (0..8)
            .map(|v| {
                contact_entry(
                    &sync,
                    id,
                    &format!("+447711{round}{v:05}"),
                    &format!("2026-11-20T10:00:0{v}Z"),
                )
            })
            .collect();
        let mut writes = tokio::task::JoinSet::new();
        for entry in versions.clone() {
            let (directory, mapping) = (sync.directory.clone(), mapping.clone());
            writes.spawn(async move {
                // A write that loses every race is transient: Dynamics retries the webhook.
                match directory.put(&entry, &mapping).await {
                    Ok(outcome) => Ok(outcome),
                    Err(error) if error.is_transient() => directory.put(&entry, &mapping).await,
                    Err(error) => Err(error),
                }
            });
        }
        for outcome in writes.join_all().await {
            outcome.unwrap();
        }
        for (v, entry) in versions.iter().enumerate() {
            let expected = usize::from(v == versions.len() - 1);
            assert_eq!(
                matches(&sync, &entry.phones[0]).await,
                expected,
                "round {round}, version {v}"
            );
        }
    }
}

#[tokio::test]
async fn a_full_reconciliation_removes_phone_items_no_entry_lists() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, &contacts_directory_yaml(50), KEY).await;
    let ids = seed_numbered_contacts(&emulator, 3);
    sync.sweep(deadline(30)).await.unwrap();
    // Phone items a half-done write left: a number of a live record it no longer
    // has, and one of a record whose entry is gone.
    for (number, id) in [("+447711955501", ids[0]), ("+447711955502", Uuid::new_v4())] {
        let text = aws_sdk_dynamodb::types::AttributeValue::S;
        aws.dynamodb
            .put_item()
            .table_name(&aws.directory_table)
            .item("pk", text(format!("phone#{number}")))
            .item("sk", text(format!("contact#{id}")))
            .item("entity", text("contact".into()))
            .item("entity_set", text("contacts".into()))
            .item("id", text(id.to_string()))
            .send()
            .await
            .unwrap();
        assert_eq!(matches(&sync, number).await, 1);
    }
    // The next full pass (a fresh checkpoint table: no delta link yet).
    let fresh = directory_sync(&emulator, &aws, &contacts_directory_yaml(50), KEY).await;
    let reports = fresh.sweep(deadline(30)).await.unwrap();
    assert!(
        reports[0].full_reconciliation && reports[0].finished,
        "{reports:?}"
    );
    assert_eq!(reports[0].removed_orphan_phones, 2, "{reports:?}");
    assert_eq!(matches(&sync, "+447711955501").await, 0);
    assert_eq!(matches(&sync, "+447711955502").await, 0);
    for n in 0..3 {
        assert_eq!(matches(&sync, &numbered_phone(n)).await, 1, "live {n} kept");
    }
}

#[tokio::test]
async fn a_sweep_page_read_before_a_webhook_does_not_overwrite_it() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let mapping = sync.config.mapping_for("contact").unwrap().clone();
    let id = Uuid::new_v4();
    let newer = contact_entry(&sync, id, "+447711966602", "2026-11-20T10:00:02Z");
    sync.directory.put(&newer, &mapping).await.unwrap();
    // The page was read before the webhook's change.
    let page = [contact_entry(
        &sync,
        id,
        "+447711966601",
        "2026-11-20T10:00:01Z",
    )];
    sync.directory.put_page(&page, &mapping, 1).await.unwrap();
    assert_eq!(
        matches(&sync, "+447711966602").await,
        1,
        "the webhook's number stays"
    );
    assert_eq!(
        matches(&sync, "+447711966601").await,
        0,
        "the page's older number is not written"
    );
}

/// A transcript whose note is still to be made (Dynamics down) is read again from
/// S3 when the note can be written: the state never holds its text, so no
/// transcript, whatever its characters, can push the state over DynamoDB's 400 KB.
#[tokio::test]
async fn a_transcript_waiting_for_dynamics_is_not_carried_in_the_contact_state() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    // 100,000 four-byte characters: a note's worth of text, 400 KB as UTF-8.
    let lines: Vec<Value> = (0..10)
        .map(|_| json!({"Content": "\u{1F4DE}".repeat(10_000), "ParticipantRole": "CUSTOMER", "DisplayName": "Nadia"}))
        .collect();
    chat_transcript_is(&aws, &scenario, lines).await;
    emulator.set_faults(dataverse_emulator::Faults {
        unavailable_ratio: 1.0,
        ..dataverse_emulator::Faults::default()
    });
    for (kind, event) in scenario.events.clone() {
        let answer = e2e::contact::handle(&lifecycle, kind, event, deadline(3)).await;
        assert!(answer.is_ok(), "{kind:?} handed off: {answer:?}");
    }
    let state = state_item_bytes(&aws, &scenario.contact_id).await;
    assert!(
        state < 20_000,
        "no transcript text in the state: {state} bytes"
    );
    emulator.clear_faults();
    drain_retries(&lifecycle, &aws).await;
    let letters = aws.dead_letters().await;
    assert!(letters.is_empty(), "nothing given up: {letters:?}");
    let notes = e2e::contact::notes(&emulator);
    assert_eq!(notes.len(), 1, "the note, once");
    assert_eq!(notes[0].chars().count(), 100_000);
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["statecode"], 1);
    let state = state_item_bytes(&aws, &scenario.contact_id).await;
    assert!(state < 20_000, "{state} bytes");
}

/// A first attempt that took the contact's lock and died before saving leaves an
/// item holding only the lock: it expires like any state item, not never.
#[tokio::test]
async fn a_lock_left_by_a_crashed_first_attempt_expires() {
    let aws = AwsResources::create().await;
    let store =
        shared::contact_state::ContactStateStore::dynamodb(aws.dynamodb.clone(), &aws.state_table);
    let contact_id = Uuid::new_v4();
    let taken = store
        .lock(
            contact_id,
            Duration::from_secs(10),
            Instant::now() + Duration::from_secs(2),
        )
        .await
        .unwrap();
    assert!(taken.is_some(), "the lock is free");
    let item = state_item(&aws, &contact_id.to_string()).await;
    assert!(!item.contains_key("state"), "only the lock: {item:?}");
    let expires: u64 = item
        .get("ttl")
        .and_then(|ttl| ttl.as_n().ok())
        .and_then(|n| n.parse().ok())
        .expect("a TTL on the lock-only item");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        expires > now && expires <= now + 8 * 86_400,
        "expires within days: {expires} (now {now})"
    );
}

/// Another invocation's lock on the contact, held for ten minutes.
async fn lock_held_elsewhere(aws: &AwsResources, contact_id: &str) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 600_000;
    aws.dynamodb
        .put_item()
        .table_name(&aws.state_table)
        .item("contact_id", AttributeValue::S(contact_id.to_owned()))
        .item("lock_owner", AttributeValue::S("another-container".into()))
        .item("lock_until", AttributeValue::N(until.to_string()))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_contact_that_stays_locked_is_given_up_after_the_retry_window_not_requeued_forever() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let scenario = scenario(&aws).await;
    let answered = scenario
        .events
        .iter()
        .find(|(kind, _)| *kind == e2e::contact::Kind::Answered)
        .map(|(_, event)| event.clone())
        .unwrap();
    lock_held_elsewhere(&aws, &scenario.contact_id).await;

    // Within the window: handed to the retry queue as the next attempt.
    let lifecycle = lifecycle(&emulator, &aws, "");
    deliver(&lifecycle, e2e::contact::Kind::Answered, answered.clone()).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await; // the retry's delay
    let retries = aws.drain(&aws.retry_queue).await;
    assert_eq!(retries.len(), 1);
    let message: Value = serde_json::from_str(retries[0].body().unwrap()).unwrap();
    assert_eq!(message["attempt"], 1, "{message}");

    // The same retry once the window has passed: a dead letter that says why and
    // carries the facts to replay, instead of another turn through the queue.
    let mut late = message.clone();
    late["first_seen"] = json!(late["first_seen"].as_u64().unwrap() - 120);
    let one_minute = e2e::lifecycle(&emulator, &aws, "contact:\n  retry_window_minutes: 1\n");
    let answer = shared::handlers::contact_created(
        &one_minute,
        json!({"Records": [{"messageId": "m-1", "body": late.to_string(), "eventSource": "aws:sqs"}]}),
        deadline(30),
    )
    .await
    .unwrap();
    assert_eq!(answer["batchItemFailures"], json!([]), "{answer}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        aws.drain(&aws.retry_queue).await.is_empty(),
        "not re-queued"
    );
    let dead = aws.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap()
            .contains("another invocation"),
        "{dead:?}"
    );
    assert_eq!(dead[0]["event"]["step"], "answered", "{dead:?}");
}

/// An `Object Created` event for `key` in the scenario's bucket, the object written
/// first when it is a transcript.
async fn file_event(
    aws: &AwsResources,
    template: &Value,
    key: &str,
    transcript: Option<&str>,
) -> Value {
    if let Some(text) = transcript {
        let body = json!({"Transcript": [{"Content": text, "ParticipantRole": "CUSTOMER", "DisplayName": "Nadia"}]});
        aws.s3
            .put_object()
            .bucket(&aws.bucket)
            .key(key)
            .body(body.to_string().into_bytes().into())
            .send()
            .await
            .unwrap();
    }
    let mut event = template.clone();
    event["detail"]["object"]["key"] = json!(key);
    event["detail"]["object"]["size"] = json!(400);
    event
}

/// The events of Contact Lens writing a contact's analysis twice: the original and
/// (redaction on) the redacted copy, with these transcript texts.
async fn contact_lens_events(
    aws: &AwsResources,
    template: &Value,
    contact_id: &str,
    original_text: &str,
    redacted_text: &str,
) -> (Value, Value) {
    let original_key =
        format!("Analysis/Voice/2025/03/11/{contact_id}_analysis_2025-03-11T09:52:10Z.json");
    let redacted_key = format!(
        "Analysis/Voice/Redacted/2025/03/11/{contact_id}_analysis_redacted_2025-03-11T09:52:10Z.json"
    );
    (
        file_event(aws, template, &original_key, Some(original_text)).await,
        file_event(aws, template, &redacted_key, Some(redacted_text)).await,
    )
}

#[tokio::test]
async fn every_file_of_a_contact_keeps_its_link_and_only_the_redacted_transcript_is_a_note() {
    let aws = AwsResources::create().await;
    for redacted_first in [false, true] {
        let emulator = emulator().await;
        let lifecycle = lifecycle(&emulator, &aws, "");
        let scenario = scenario(&aws).await;
        let id = &scenario.contact_id;
        let (steps, recording) = scenario.events.split_at(4);
        let recording = &recording[0].1;
        let recording_key =
            format!("connect/example-cc/CallRecordings/2025/03/11/{id}_20250311T09:41_UTC.wav");
        let call = file_event(&aws, recording, &recording_key, None).await;
        let (original, redacted) = contact_lens_events(
            &aws,
            recording,
            id,
            "My card is 4111 1111 1111 1111",
            "My card is [PII]",
        )
        .await;
        let analyses = if redacted_first {
            [redacted, original]
        } else {
            [original, redacted]
        };
        for (kind, event) in steps {
            deliver(&lifecycle, *kind, event.clone()).await;
        }
        deliver(&lifecycle, e2e::contact::Kind::Recording, call).await;
        for event in analyses {
            deliver(&lifecycle, e2e::contact::Kind::Recording, event).await;
        }
        drain_retries(&lifecycle, &aws).await;

        let records = phonecalls(&emulator);
        assert_eq!(records.len(), 1);
        let description = records[0]["description"].as_str().unwrap_or_default();
        for (line, file) in [
            ("Call recording: ", format!("{id}_20250311T09")),
            ("Contact lens analysis: ", format!("{id}_analysis_2025")),
            (
                "Contact lens analysis (redacted): ",
                format!("{id}_analysis_redacted_"),
            ),
        ] {
            assert!(
                description
                    .lines()
                    .any(|l| l.starts_with(line) && l.contains(&file)),
                "redacted first: {redacted_first}; no `{line}` line for {file} in:\n{description}"
            );
        }
        assert_eq!(records[0]["statecode"], 1, "closed");
        let notes = e2e::contact::notes(&emulator);
        assert_eq!(
            notes.len(),
            1,
            "redacted first: {redacted_first}: {notes:?}"
        );
        assert!(notes[0].contains("[PII]"), "{notes:?}");
        assert!(!notes.iter().any(|n| n.contains("4111")), "{notes:?}");
        assert!(aws.dead_letters().await.is_empty());
    }
}

#[tokio::test]
async fn both_transcripts_become_notes_when_the_configuration_asks_for_the_original() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(
        &emulator,
        &aws,
        "contact:\n  original_transcript_notes: true\n",
    );
    let scenario = scenario(&aws).await;
    let id = &scenario.contact_id;
    let (steps, recording) = scenario.events.split_at(4);
    let (original, redacted) =
        contact_lens_events(&aws, &recording[0].1, id, "original text", "redacted text").await;
    for (kind, event) in steps {
        deliver(&lifecycle, *kind, event.clone()).await;
    }
    for event in [original, redacted] {
        deliver(&lifecycle, e2e::contact::Kind::Recording, event).await;
    }
    assert_eq!(e2e::contact::notes(&emulator).len(), 2);
}

/// What a contact left: its records, the dead letters, the writes refused with 400.
struct ColumnCase {
    records: Vec<Map<String, Value>>,
    letters: Vec<Value>,
    refused_writes: usize,
}

/// One contact whose templates add `yaml` (under `contact:`), with the phonecall
/// schema strict; `after_flow` changes Dynamics once the flow has created the record.
async fn contact_with_column_trouble(
    yaml: &str,
    after_flow: impl FnOnce(&dataverse_emulator::Emulator),
) -> ColumnCase {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    emulator.define_column("phonecalls", "new_stage", Kind::Text(100));
    let lifecycle = lifecycle(&emulator, &aws, yaml);
    let mut events = scenario(&aws).await.events.into_iter();
    if let Some((kind, flow)) = events.next() {
        let answer = deliver(&lifecycle, kind, flow).await;
        assert_eq!(answer["dynamics_status"], "created", "{answer}");
    }
    after_flow(&emulator);
    for (kind, event) in events {
        deliver(&lifecycle, kind, event).await;
    }
    drain_retries(&lifecycle, &aws).await;
    ColumnCase {
        records: phonecalls(&emulator),
        letters: aws.dead_letters().await,
        refused_writes: refusals(&emulator, 400),
    }
}

/// The one dead letter of a refused column: its step, value and Dataverse's answer.
fn assert_column_letter(letters: &[Value], column: &str, step: &str, value: Value, answer: &str) {
    assert_eq!(letters.len(), 1, "one dead letter: {letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["column"]["name"], column, "{letter}");
    assert_eq!(letter["column"]["value"], value, "{letter}");
    assert_eq!(letter["step"], step, "{letter}");
    let message = letter["column"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(answer), "{message}");
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(column),
        "{letter}"
    );
}

#[tokio::test]
async fn a_column_deleted_after_the_flow_costs_that_column_not_the_later_steps() {
    let case = contact_with_column_trouble(
        "contact:\n  answered:\n    body:\n      new_stage: answered by an agent\n",
        |emulator| emulator.remove_column("phonecalls", "new_stage"),
    )
    .await;
    assert_eq!(case.records.len(), 1, "one record");
    assert_complete(&case.records[0]);
    assert!(case.records[0].get("new_stage").is_none());
    assert_column_letter(
        &case.letters,
        "new_stage",
        "answered",
        json!("answered by an agent"),
        "does not exist on type",
    );
    assert_eq!(case.refused_writes, 1, "later writes no longer carry it");
    println!(
        "deleted column: {} record, {} of its columns kept, {} dead letter",
        case.records.len(),
        case.records[0].len(),
        case.letters.len()
    );
}

#[tokio::test]
async fn an_option_value_that_does_not_exist_costs_that_column() {
    let case = contact_with_column_trouble(
        "contact:\n  answered:\n    body:\n      prioritycode: 7\n      new_stage: answered\n",
        |_| {},
    )
    .await;
    assert_eq!(case.records.len(), 1);
    assert_complete(&case.records[0]);
    assert_eq!(
        case.records[0]["new_stage"], "answered",
        "the step's other column"
    );
    assert!(case.records[0].get("prioritycode").is_none());
    assert_column_letter(
        &case.letters,
        "prioritycode",
        "answered",
        json!(7),
        "outside the valid range",
    );
    assert_eq!(case.refused_writes, 1);
}

#[tokio::test]
async fn a_value_of_the_wrong_type_costs_that_column() {
    let case = contact_with_column_trouble(
        "contact:\n  ended:\n    body:\n      actualend: \"{{ DisconnectTimestamp | datetime }}\"\n      actualdurationminutes: a few\n    close:\n      statecode: 1\n      statuscode: 4\n",
        |_| {},
    )
    .await;
    assert_eq!(case.records.len(), 1);
    assert_complete(&case.records[0]);
    assert!(case.records[0].get("actualdurationminutes").is_none());
    assert_column_letter(
        &case.letters,
        "actualdurationminutes",
        "ended",
        json!("a few"),
        "Cannot convert the literal 'a few'",
    );
}

#[tokio::test]
async fn a_text_too_long_for_its_column_on_the_create_still_creates_the_linked_record() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let long_subject = "{{ ContactId }}".repeat(6);
    let lifecycle = lifecycle(
        &emulator,
        &aws,
        &format!(
            "contact:\n  created:\n    body:\n      subject: \"{long_subject}\"\n      phonenumber: \"{{{{ CustomerEndpoint }}}}\"\n      actualstart: \"{{{{ InitiationTimestamp | datetime }}}}\"\n      description: Amazon Connect chat contact\n"
        ),
    );
    let sync = directory_sync(&emulator, &aws, "", KEY).await;
    let customer = emulator.seed(
        "contacts",
        json!({"lastname": "Holt", "mobilephone": "+447700900123"}),
    );
    sync.sweep(deadline(30)).await.unwrap();

    let answer = run_contact(&lifecycle, &aws).await;
    assert_eq!(answer["dynamics_status"], "created", "{answer}");
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_complete(record);
    assert!(record.get("subject").is_none());
    assert_eq!(
        record["activityid"], answer["dynamics_record_id"],
        "the deterministic id"
    );
    assert_eq!(
        record["_regardingobjectid_value"],
        customer.to_string(),
        "the customer link"
    );
    let letters = aws.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["column"]["name"], "subject");
    assert_eq!(letters[0]["step"], "created");
    let value = letters[0]["column"]["value"].as_str().unwrap_or_default();
    assert_eq!(value.len(), 216, "the whole value, to replay: {value}");
    assert!(
        letters[0]["column"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("maximum allowed length of '200'")
    );
}

/// Every event 1-2 times in seeded orders, sequentially and concurrently, with a
/// column Dynamics refuses in play: one record, equal to the in-order one, and one
/// dead letter for the column.
#[tokio::test]
async fn shuffled_delivery_with_a_refused_column_is_still_exactly_once() {
    const YAML: &str =
        "contact:\n  answered:\n    body:\n      new_gone: answered\n      new_stage: answered\n";
    let reference = contact_with_column_trouble(YAML, |_| {}).await;
    assert_eq!(reference.letters.len(), 1);
    for seed in 0..4u64 {
        let emulator = emulator().await;
        let aws = AwsResources::create().await;
        emulator.define_column("phonecalls", "new_stage", Kind::Text(100));
        let lifecycle = std::sync::Arc::new(lifecycle(&emulator, &aws, YAML));
        let scenario = scenario(&aws).await;
        let mut rng = e2e::contact::fastrand_like(seed);
        let mut deliveries = Vec::new();
        for (kind, event) in &scenario.events {
            for _ in 0..(1 + rng.next_u64() % 2) {
                deliveries.push((*kind, event.clone()));
            }
        }
        for i in (1..deliveries.len()).rev() {
            deliveries.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (kind, event) in deliveries {
            let lifecycle = lifecycle.clone();
            if seed % 2 == 0 {
                deliver(&lifecycle, kind, event).await;
            } else {
                tasks.spawn(async move { deliver(&lifecycle, kind, event).await });
            }
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        drain_retries(&lifecycle, &aws).await;
        let records = phonecalls(&emulator);
        let comparable = |records: &[Map<String, Value>]| -> Vec<Map<String, Value>> {
            records
                .iter()
                .map(|record| {
                    let mut record = record.clone();
                    // The contact's own id and its mentions differ between the runs.
                    record.retain(|key, _| {
                        !matches!(key.as_str(), "activityid" | "description" | "subject")
                    });
                    record
                })
                .collect()
        };
        assert_eq!(records.len(), 1, "seed {seed}: one record");
        assert_eq!(
            comparable(&records),
            comparable(&reference.records),
            "seed {seed}"
        );
        let letters = aws.dead_letters().await;
        assert_eq!(
            letters.len(),
            1,
            "seed {seed}: one dead letter: {letters:?}"
        );
        assert_eq!(letters[0]["column"]["name"], "new_gone");
    }
}

/// `validate --live`: the same refusals, found before a deployment with the key path.
#[tokio::test]
async fn a_live_validation_names_the_template_columns_dynamics_would_refuse() {
    let emulator = emulator().await;
    let client = e2e::client(&emulator, None);
    let check = |yaml: String| {
        let client = &client;
        async move {
            let config = shared::config::Config::from_yaml(&yaml).unwrap();
            shared::schema_check::check_record_templates(&config, client, deadline(10))
                .await
                .unwrap()
        }
    };
    assert_eq!(
        check(e2e::config_yaml(&emulator)).await,
        [],
        "the default templates fit the table"
    );

    emulator.define_column("phonecalls", "new_stage", Kind::Text(10));
    emulator.define_column("phonecalls", "new_mood", Kind::Text(100));
    emulator.remove_column("phonecalls", "new_mood");
    let templates = "contact:
  answered:
    body:
      new_mood: calm
      new_stage: answered by an agent
      prioritycode: 7
      description: \"{{ ContactId }}\"
  ended:
    body:
      actualend: \"{{ DisconnectTimestamp | datetime }}\"
      actualdurationminutes: a few
      regardingobjectid_Contact_phonecall@odata.bind: /contacts(00000000-0000-0000-0000-000000000001)
    close:
      statecode: 1
      statuscode: 4
";
    let findings = check(format!("{}{templates}", e2e::config_yaml(&emulator))).await;
    let paths: Vec<&str> = findings.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "contact.answered.body.new_mood",
            "contact.answered.body.new_stage",
            "contact.answered.body.prioritycode",
            "contact.ended.body.actualdurationminutes",
            "contact.ended.body.regardingobjectid_Contact_phonecall@odata.bind",
        ],
        "{findings:#?}"
    );
    let problems: Vec<String> = findings.iter().map(ToString::to_string).collect();
    assert!(
        problems[0].contains("not a column of phonecall"),
        "{problems:?}"
    );
    assert!(
        problems[1].contains("20 characters, the column holds 10"),
        "{problems:?}"
    );
    assert!(
        problems[2].contains("7 is not one of its options (0, 1, 2)"),
        "{problems:?}"
    );
    assert!(problems[3].contains("not a whole number"), "{problems:?}");
    assert!(
        problems[4].contains("no navigation property"),
        "{problems:?}"
    );
    // Only the table's columns the templates write were read.
    let reads: Vec<String> = emulator
        .requests()
        .iter()
        .filter(|r| r.target.contains("/Attributes"))
        .map(|r| r.target.clone())
        .collect();
    assert!(!reads.is_empty(), "the column definitions were read");
    assert!(
        reads
            .iter()
            .all(|target| target.contains("%24filter=") || target.contains("$filter=")),
        "{reads:?}"
    );
}
