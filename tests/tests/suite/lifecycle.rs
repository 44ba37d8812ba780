//! The contact lifecycle end to end: the deployed handlers against the Dataverse
//! emulator and moto_server (DynamoDB, SQS, S3).

use std::time::{Duration, Instant};

use dataverse_emulator::Faults;
use e2e::contact::{
    Kind, SAMPLE_AGENT, deliver, fastrand_like, notes, owner_lifecycle, phonecalls,
    reference_record, sample_agent_is, scenario,
};
use e2e::{AwsResources, deadline, drain_retries, emulator, fixture, lifecycle};
use serde_json::{Value, json};
use shared::handlers;
use shared::lifecycle::Lifecycle;

#[tokio::test]
async fn in_order_lifecycle_builds_one_complete_record() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    let tokens_before = emulator.token_requests();
    let dynamodb_before = aws.dynamodb_requests.count();

    let mut answer = Value::Null;
    for (kind, event) in scenario.events.clone() {
        let result = deliver(&lifecycle, kind, event).await;
        if kind == Kind::Flow {
            answer = result;
        }
    }
    assert_eq!(
        drain_retries(&lifecycle, &aws).await,
        0,
        "nothing was deferred"
    );

    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    let record_id = record["activityid"].as_str().unwrap();
    assert_eq!(answer["dynamics_record_id"], record_id);
    assert_eq!(answer["dynamics_status"], "created");
    assert_eq!(answer["dynamics_customer_matched"], "false");
    let screen_pop = answer["dynamics_screen_pop_url"].as_str().unwrap();
    assert_eq!(
        screen_pop,
        format!(
            "{}/main.aspx?pagetype=entityrecord&etn=phonecall&id={record_id}",
            emulator.org_url()
        )
    );
    assert!(
        answer.as_object().unwrap().values().all(Value::is_string),
        "the flow answer is a flat string map"
    );

    assert_eq!(record["phonenumber"], "+447700900123");
    assert_eq!(record["directioncode"], false);
    assert_eq!(record["actualstart"], "2025-03-11T09:41:06Z");
    assert_eq!(record["actualend"], "2025-03-11T13:26:48Z");
    assert_eq!(record["statecode"], 1);
    assert_eq!(record["statuscode"], 4);
    let description = record["description"].as_str().unwrap();
    assert!(description.contains("Chat transcript:"), "{description}");
    assert!(description.contains(&scenario.contact_id), "{description}");
    let notes = notes(&emulator);
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0].contains("Nadia: Hello, my luggage is lost"),
        "{}",
        notes[0]
    );

    let log = emulator.requests();
    assert!(
        log.iter()
            .filter(|r| r.method == "PATCH" && r.body.contains("statecode\":1"))
            .count()
            >= 1
    );
    assert!(
        log.iter()
            .filter(|r| r.method == "PATCH")
            .skip(1)
            .all(|r| r.header("if-match") == Some("*") || r.header("if-none-match") == Some("*")),
        "every write after the creating upsert is an update that cannot create"
    );
    println!(
        "one lifecycle: {} Dataverse requests, {} token requests, {} DynamoDB requests",
        log.len(),
        emulator.token_requests() - tokens_before,
        aws.dynamodb_requests.count() - dynamodb_before
    );
    assert!(aws.dead_letters().await.is_empty());
}

/// Every event 1-3 times, in seeded random orders, sequentially and concurrently:
/// the final record equals the in-order one, field by field.
#[tokio::test]
async fn shuffled_and_duplicated_delivery_gives_the_in_order_record() {
    for seed in 0..10u64 {
        let emulator = emulator().await;
        let aws = AwsResources::create().await;
        let lifecycle = std::sync::Arc::new(lifecycle(&emulator, &aws, ""));
        let scenario = scenario(&aws).await;
        // The reference shares the contact id, so the records must be identical.
        let (expected, expected_notes) = reference_record(&scenario.events).await;

        let mut rng = fastrand_like(seed);
        let mut deliveries: Vec<(Kind, Value)> = Vec::new();
        for (kind, event) in &scenario.events {
            for _ in 0..(1 + rng.next_u64() % 3) {
                deliveries.push((*kind, event.clone()));
            }
        }
        for i in (1..deliveries.len()).rev() {
            deliveries.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let order: Vec<Kind> = deliveries.iter().map(|(k, _)| *k).collect();
        if seed % 2 == 0 {
            for (kind, event) in deliveries {
                deliver(&lifecycle, kind, event).await;
            }
        } else {
            let mut tasks = tokio::task::JoinSet::new();
            for (kind, event) in deliveries {
                let lifecycle = lifecycle.clone();
                tasks.spawn(async move { deliver(&lifecycle, kind, event).await });
            }
            while let Some(result) = tasks.join_next().await {
                result.unwrap();
            }
        }
        drain_retries(&lifecycle, &aws).await;
        let actual = phonecalls(&emulator);
        assert_eq!(
            actual.len(),
            1,
            "seed {seed}, order {order:?}: exactly one record"
        );
        assert_eq!(actual, expected, "seed {seed}, order {order:?}");
        assert_eq!(
            notes(&emulator),
            expected_notes,
            "seed {seed}: the note exists once"
        );
        assert!(
            aws.dead_letters().await.is_empty(),
            "seed {seed}: nothing dead-lettered"
        );
    }
}

#[tokio::test]
async fn throttle_storm_still_yields_the_in_order_record() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    let (expected, _) = reference_record(&scenario.events).await;
    emulator.set_faults(Faults {
        throttle_ratio: 0.3,
        retry_after_secs: 1,
        ..Faults::default()
    });
    for (kind, event) in scenario.events.clone() {
        deliver(&lifecycle, kind, event).await;
    }
    drain_retries(&lifecycle, &aws).await;
    assert_eq!(phonecalls(&emulator), expected);
    assert!(emulator.requests().iter().any(|r| r.status == 429));
    assert_eq!(emulator.premature_requests(), 0);
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn dynamics_down_the_flow_still_answers_in_time_and_the_record_appears_later() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    emulator.set_faults(Faults {
        unavailable_ratio: 1.0,
        ..Faults::default()
    });
    let (_, flow_event) = scenario.events[0].clone();
    let started = Instant::now();
    let answer = deliver(&lifecycle, Kind::Flow, flow_event).await;
    let elapsed = started.elapsed();
    println!("flow answered in {elapsed:?} with Dynamics down");
    assert!(
        elapsed < Duration::from_secs(5),
        "the flow must answer well inside 8 s, took {elapsed:?}"
    );
    assert_eq!(answer["dynamics_status"], "pending");
    let record_id = answer["dynamics_record_id"].as_str().unwrap().to_owned();
    assert!(emulator.records("phonecalls").is_empty());

    // The rest of the contact happens while Dynamics is still down.
    for (kind, event) in scenario.events[2..4].iter().cloned() {
        deliver(&lifecycle, kind, event).await;
    }
    emulator.clear_faults();
    drain_retries(&lifecycle, &aws).await;
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["activityid"], record_id.as_str());
    assert_eq!(records[0]["statecode"], 1);
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn recording_before_the_end_is_kept_and_the_close_comes_last() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    for index in [0, 4, 2, 3] {
        let (kind, event) = scenario.events[index].clone();
        deliver(&lifecycle, kind, event).await;
    }
    let record = &phonecalls(&emulator)[0];
    assert!(
        record["description"]
            .as_str()
            .unwrap()
            .contains("Chat transcript:")
    );
    assert_eq!(record["statecode"], 1);
    let last_patch = emulator
        .requests()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .unwrap();
    assert!(
        last_patch.body.contains("\"statecode\":1"),
        "the close is the last write: {}",
        last_patch.body
    );
}

#[tokio::test]
async fn events_for_a_contact_never_created_give_up_after_the_window() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    let (_, answered) = scenario.events[2].clone();
    deliver(&lifecycle, Kind::Answered, answered).await;
    let deferred = aws.drain(&aws.retry_queue).await;
    assert_eq!(deferred.len(), 1, "the update waits for the creation");
    // Replay the retry as if the window had passed.
    let mut message: Value = serde_json::from_str(deferred[0].body().unwrap()).unwrap();
    message["first_seen"] = json!(1);
    let batch = json!({"Records": [{"messageId": "m1", "body": message.to_string(), "eventSource": "aws:sqs"}]});
    handlers::contact_created(&lifecycle, batch, deadline(10))
        .await
        .unwrap();
    let letters = aws.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("creation has not been seen"),
        "{}",
        letters[0]
    );
    assert_eq!(letters[0]["contact_id"], scenario.contact_id.as_str());
    assert!(emulator.records("phonecalls").is_empty());
    assert!(aws.drain(&aws.retry_queue).await.is_empty());
}

/// A refusal that names no column the write carried refuses the whole write.
#[tokio::test]
async fn a_write_dataverse_refuses_outright_is_dead_lettered_once_with_the_odata_error() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(
        &emulator,
        &aws,
        "contact:\n  created:\n    body:\n      subject: \"{{ ContactId }}\"\n      statecode: 1\n",
    );
    let scenario = scenario(&aws).await;
    let (_, flow_event) = scenario.events[0].clone();
    let answer = deliver(&lifecycle, Kind::Flow, flow_event).await;
    assert_eq!(answer["dynamics_status"], "failed");
    let letters = aws.dead_letters().await;
    assert_eq!(letters.len(), 1);
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(reason.contains("0x80040203"), "{reason}");
    assert_eq!(letters[0]["step"], "created");
    assert!(letters[0].get("column").is_none(), "{}", letters[0]);
    let writes = emulator
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .count();
    assert_eq!(writes, 1, "a permanent error is not retried");
}

#[tokio::test]
async fn chat_contacts_without_endpoints_work() {
    // aws_lambda_events' own type refuses the chat event; ours takes it.
    let chat = fixture("connect-flow-event-chat.json");
    assert!(
        serde_json::from_value::<aws_lambda_events::event::connect::ConnectEvent>(chat.clone())
            .is_err()
    );
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let answer = deliver(&lifecycle, Kind::Flow, chat).await;
    assert_eq!(answer["dynamics_status"], "created");
    let record = &phonecalls(&emulator)[0];
    assert_eq!(record["phonenumber"], Value::Null);
    assert_eq!(record["subject"], "Chat from an unknown number");
}

#[tokio::test]
async fn malformed_events_get_clear_errors_and_never_panic() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    // The flow gets an error naming the problem.
    for bad in [
        json!({"Details": {}}),
        json!({"Details": {"ContactData": {"ContactId": "not-a-uuid"}}}),
    ] {
        let error = handlers::contact_created(&lifecycle, bad, deadline(8))
            .await
            .unwrap_err();
        assert!(error.to_string().starts_with("malformed event"), "{error}");
    }
    // Asynchronous triggers dead-letter the event with the reason and succeed (no retry can help).
    let bad_events = [
        (
            Kind::Answered,
            json!({"detail-type": "Amazon Connect Contact Event", "source": "aws.connect", "detail": {"eventType": "CONNECTED_TO_AGENT"}}),
        ),
        (
            Kind::Ended,
            json!({"detail-type": "Amazon Connect Contact Event", "source": "aws.connect", "detail": {"eventType": "DISCONNECTED", "contactId": "x)/../accounts"}}),
        ),
        (
            Kind::Recording,
            json!({"detail-type": "Object Created", "source": "aws.s3", "detail": {"bucket": {}}}),
        ),
        (Kind::Answered, json!([1, 2, 3])),
    ];
    for (kind, event) in bad_events {
        deliver(&lifecycle, kind, event).await;
    }
    let letters = aws.dead_letters().await;
    assert_eq!(letters.len(), 4, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| !l["reason"].as_str().unwrap().is_empty())
    );
    // Keys that are not recordings are skipped, not dead-lettered.
    let mut other = fixture("s3-object-created.json");
    other["detail"]["object"]["key"] = json!("connect/example-cc/Reports/daily.csv");
    deliver(&lifecycle, Kind::Recording, other).await;
    assert!(aws.dead_letters().await.is_empty());
    assert!(emulator.requests().is_empty());
}

#[tokio::test]
async fn a_caller_in_the_directory_is_attached_to_the_record() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let sync = e2e::directory_sync(&emulator, &aws, "", "key").await;
    let customer = emulator.seed(
        "contacts",
        json!({"firstname": "Maren", "lastname": "Holt", "mobilephone": "07700 900123"}),
    );
    sync.sweep(deadline(30)).await.unwrap();
    let scenario = scenario(&aws).await;
    let (_, flow_event) = scenario.events[0].clone();
    let answer = deliver(&lifecycle, Kind::Flow, flow_event).await;
    assert_eq!(answer["dynamics_customer_matched"], "true");
    assert_eq!(
        answer["dynamics_customer_id"],
        customer.to_string().as_str()
    );
    assert_eq!(answer["dynamics_customer_name"], "Maren Holt");
    let record = &phonecalls(&emulator)[0];
    assert_eq!(
        record["_regardingobjectid_value"],
        customer.to_string().as_str()
    );
    assert_eq!(
        record["_regardingobjectid_value@Microsoft.Dynamics.CRM.lookuplogicalname"],
        "contact"
    );
}

#[tokio::test]
async fn the_caller_can_be_bound_as_an_activity_party() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(
        &emulator,
        &aws,
        "contact:\n  bind_customer_as: activity_party\n",
    );
    let sync = e2e::directory_sync(&emulator, &aws, "", "key").await;
    let customer = emulator.seed(
        "contacts",
        json!({"lastname": "Holt", "mobilephone": "+447700900123"}),
    );
    sync.sweep(deadline(30)).await.unwrap();
    let scenario = scenario(&aws).await;
    let (_, flow_event) = scenario.events[0].clone();
    deliver(&lifecycle, Kind::Flow, flow_event).await;
    let record = &phonecalls(&emulator)[0];
    assert_eq!(
        record["phonecall_activity_parties"],
        json!([{"partyid_contact@odata.bind": format!("/contacts({customer})"), "participationtypemask": 1}])
    );
    assert!(record.get("_regardingobjectid_value").is_none());
}

#[tokio::test]
async fn recordings_can_be_linked_with_a_bounded_presigned_url() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(
        &emulator,
        &aws,
        "contact:\n  recording_presign_seconds: 3600\n",
    );
    let scenario = scenario(&aws).await;
    for index in [0, 4] {
        let (kind, event) = scenario.events[index].clone();
        deliver(&lifecycle, kind, event).await;
    }
    let description = phonecalls(&emulator)[0]["description"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(description.contains(&aws.bucket), "{description}");
    assert!(
        description.contains("X-Amz-Expires=3600") && description.contains("X-Amz-Signature="),
        "{description}"
    );
}

async fn run_contact(lifecycle: &Lifecycle, aws: &AwsResources) {
    let (_, retries) = e2e::contact::run_contact(lifecycle, aws).await;
    assert_eq!(retries, 0, "nothing deferred");
}

#[tokio::test]
async fn the_agent_is_named_from_describe_user_and_owns_the_record() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    sample_agent_is(&emulator, "ana.silva", Some("Ana.Silva@example.com"));
    let owner = emulator.seed(
        "systemusers",
        json!({"fullname": "Ana Silva", "internalemailaddress": "ana.silva@example.com"}),
    );
    let lifecycle = owner_lifecycle(&emulator, &aws, "internalemailaddress");
    run_contact(&lifecycle, &aws).await;
    run_contact(&lifecycle, &aws).await;

    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 2);
    for record in &records {
        let description = record["description"].as_str().unwrap();
        assert!(
            description.contains("Answered by agent ana.silva"),
            "{description}"
        );
        assert_eq!(record["_ownerid_value"], owner.to_string());
        assert_eq!(
            record["_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"],
            "systemuser"
        );
    }
    assert_eq!(
        emulator.describe_user_requests(),
        1,
        "one DescribeUser for two contacts of the same agent"
    );
    let owner_queries = emulator
        .requests()
        .iter()
        .filter(|r| r.target.contains("systemusers"))
        .count();
    assert_eq!(owner_queries, 1, "one systemusers query for the same agent");
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn an_agent_connect_or_dynamics_does_not_know_leaves_the_id_and_the_owner() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = owner_lifecycle(&emulator, &aws, "domainname");
    run_contact(&lifecycle, &aws).await;
    let record = &phonecalls(&emulator)[0];
    let description = record["description"].as_str().unwrap();
    assert!(
        description.contains(&format!("Answered by agent {SAMPLE_AGENT}")),
        "{description}"
    );
    assert!(record.get("_ownerid_value").is_none());
    assert_eq!(emulator.describe_user_requests(), 1);

    // Known to Connect, unknown to Dynamics: named, owner untouched.
    sample_agent_is(&emulator, "ana.silva", None);
    let fresh = owner_lifecycle(&emulator, &aws, "domainname");
    run_contact(&fresh, &aws).await;
    let named = phonecalls(&emulator)
        .into_iter()
        .filter(|r| {
            r["description"]
                .as_str()
                .is_some_and(|d| d.contains("Answered by agent ana.silva"))
        })
        .count();
    assert_eq!(named, 1);
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn a_throttled_describe_user_defers_the_update_until_connect_answers() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    sample_agent_is(&emulator, "ana.silva", None);
    // More throttles than the SDK's own three attempts absorb.
    emulator.throttle_describe_user(4);
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    for (kind, event) in scenario.events {
        deliver(&lifecycle, kind, event).await;
    }
    assert!(
        drain_retries(&lifecycle, &aws).await >= 1,
        "the update was deferred"
    );
    let record = &phonecalls(&emulator)[0];
    let description = record["description"].as_str().unwrap();
    assert!(
        description.contains("Answered by agent ana.silva"),
        "{description}"
    );
    assert_eq!(record["statecode"], 1, "closed once everything was written");
    assert!(aws.dead_letters().await.is_empty());
}

/// A voice contact's events (flow, `INITIATED` a few seconds before the flow ran,
/// answered, ended, the call recording) for a fresh contact id.
fn voice_contact(aws: &AwsResources) -> (String, Vec<(Kind, Value)>) {
    let contact = uuid::Uuid::new_v4().to_string();
    let event = |name: &str| e2e::contact::retarget(fixture(name), &contact, &aws.bucket);
    let (initiated, started) = e2e::contact::initiated_before_the_flow(&contact, &aws.bucket);
    let events = vec![
        (Kind::Flow, event("connect-flow-event.json")),
        (Kind::Initiated, initiated),
        (
            Kind::Answered,
            event("connect-contact-event-connected-to-agent.json"),
        ),
        (
            Kind::Ended,
            event("connect-contact-event-disconnected.json"),
        ),
        (
            Kind::Recording,
            event("s3-object-created-connect-recording.constructed.json"),
        ),
    ];
    (started, events)
}

fn dataverse_writes(emulator: &dataverse_emulator::Emulator) -> Vec<String> {
    emulator
        .requests()
        .into_iter()
        .filter(|r| r.target.contains("/api/data/"))
        .map(|r| format!("{} {} {}", r.method, r.target, r.body))
        .collect()
}

#[tokio::test]
async fn a_voice_contact_with_its_recording_costs_four_dataverse_requests() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    // A grace no test waits for: the recording comes within it.
    let lifecycle = lifecycle(&emulator, &aws, "contact:\n  close_grace_seconds: 600\n");
    let (started, events) = voice_contact(&aws);
    for (kind, event) in events {
        deliver(&lifecycle, kind, event).await;
    }
    let requests = dataverse_writes(&emulator);
    assert_eq!(requests.len(), 4, "{requests:#?}");
    assert!(
        requests.iter().all(|r| r.starts_with("PATCH")),
        "{requests:#?}"
    );
    let record = &phonecalls(&emulator)[0];
    // The start time rode on the answered write, the close on the recording's.
    assert_eq!(record["actualstart"], json!(started));
    assert_eq!(
        (&record["statecode"], &record["statuscode"]),
        (&json!(1), &json!(4))
    );
    let description = record["description"].as_str().unwrap_or_default();
    assert!(description.contains("Call recording:"), "{description}");
    assert!(requests[3].contains("statecode") && requests[3].contains("Call recording:"));
    assert!(
        !requests[2].contains("statecode"),
        "the ended write holds the close"
    );
    // The delayed close is queued, and finds nothing to do when it comes.
    assert_eq!(aws.pending_messages(&aws.retry_queue).await, 1);
    println!(
        "a voice contact with its recording, cold container: {} Dataverse, {} token, {} DynamoDB requests",
        requests.len(),
        emulator.token_requests(),
        aws.dynamodb_requests.count()
    );
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn without_a_file_the_record_closes_alone_when_the_grace_ends() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let (_, events) = voice_contact(&aws);
    for (kind, event) in events.into_iter().take(4) {
        deliver(&lifecycle, kind, event).await;
    }
    assert_eq!(
        phonecalls(&emulator)[0]["statecode"],
        0,
        "open during the grace"
    );
    assert_eq!(drain_retries(&lifecycle, &aws).await, 0, "no retries");
    let record = &phonecalls(&emulator)[0];
    assert_eq!(
        (&record["statecode"], &record["statuscode"]),
        (&json!(1), &json!(4))
    );
    let requests = dataverse_writes(&emulator);
    assert_eq!(
        requests.len(),
        4,
        "create, answered, ended, close: {requests:#?}"
    );
    assert!(requests[3].contains("statecode"), "{requests:#?}");
}

#[tokio::test]
async fn a_file_after_the_grace_reopens_and_closes_the_record_again() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let (_, mut events) = voice_contact(&aws);
    let recording = events.pop().expect("the recording event");
    for (kind, event) in events {
        deliver(&lifecycle, kind, event).await;
    }
    drain_retries(&lifecycle, &aws).await;
    assert_eq!(phonecalls(&emulator)[0]["statecode"], 1);
    deliver(&lifecycle, recording.0, recording.1).await;
    let record = &phonecalls(&emulator)[0];
    assert_eq!(
        (&record["statecode"], &record["statuscode"]),
        (&json!(1), &json!(4))
    );
    let description = record["description"].as_str().unwrap_or_default();
    assert!(description.contains("Call recording:"), "{description}");
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn a_call_no_agent_took_is_closed_at_once() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "contact:\n  close_grace_seconds: 600\n");
    let (_, events) = voice_contact(&aws);
    let (_, flow) = events[0].clone();
    let (_, mut ended) = events[3].clone();
    ended["detail"]
        .as_object_mut()
        .expect("an event detail")
        .remove("agentInfo");
    deliver(&lifecycle, Kind::Flow, flow).await;
    deliver(&lifecycle, Kind::Ended, ended).await;
    assert_eq!(
        phonecalls(&emulator)[0]["statecode"],
        1,
        "no agent, no recording to wait for"
    );
    assert_eq!(aws.pending_messages(&aws.retry_queue).await, 0);
    assert_eq!(dataverse_writes(&emulator).len(), 2);
}

#[tokio::test]
async fn a_late_start_time_close_to_the_flows_costs_no_request_of_its_own() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let (_, events) = voice_contact(&aws);
    let (_, initiated) = events[1].clone();
    for index in [0, 2, 3] {
        let (kind, event) = events[index].clone();
        deliver(&lifecycle, kind, event).await;
    }
    drain_retries(&lifecycle, &aws).await;
    let before = dataverse_writes(&emulator).len();
    let record_before = phonecalls(&emulator);
    // After the close, a correction of seconds would cost a reopen, a write and a close.
    deliver(&lifecycle, Kind::Initiated, initiated).await;
    assert_eq!(dataverse_writes(&emulator).len(), before);
    assert_eq!(phonecalls(&emulator), record_before);

    // Beyond the tolerance (the fixture's own start, long before the flow ran), it is written.
    let (_, events) = voice_contact(&aws);
    let contact = events[0].1["Details"]["ContactData"]["ContactId"].clone();
    let far = e2e::contact::retarget(
        fixture("connect-contact-event-initiated.constructed.json"),
        contact.as_str().unwrap_or_default(),
        &aws.bucket,
    );
    deliver(&lifecycle, Kind::Flow, events[0].1.clone()).await;
    let before = dataverse_writes(&emulator).len();
    deliver(&lifecycle, Kind::Initiated, far).await;
    assert_eq!(dataverse_writes(&emulator).len(), before + 1);
}
