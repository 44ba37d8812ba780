//! Nothing lost, nothing duplicated: crashes at every request boundary, a Dynamics
//! outage, an expired token mid-lifecycle, and two containers racing on one event.

use std::sync::Arc;
use std::time::Duration;

use dataverse_emulator::{Emulator, Faults};
use e2e::contact::{Kind, Scenario, deliver, handle, notes, phonecalls, scenario};
use e2e::crash_proxy::CrashProxy;
use e2e::{
    AwsResources, aws_endpoint, deadline, drain_retries, emulator, lifecycle, lifecycle_via,
    next_retry_batch,
};
use serde_json::{Map, Value};
use shared::lifecycle::Lifecycle;

/// The invocation time given to each event here: a crashed invocation's contact
/// lock then runs out after 10 s (its remaining time, at least 5 s, plus 5 s).
const INVOCATION_SECONDS: u64 = 5;
const LOCK_RUNS_OUT: Duration = Duration::from_millis(10_500);

/// A contact's record and notes with its own ids and bucket replaced, so runs of
/// different contacts compare field by field.
fn normalised(emulator: &Emulator, scenario: &Scenario, bucket: &str) -> (Vec<Value>, Vec<String>) {
    let records: Vec<Map<String, Value>> = phonecalls(emulator);
    let record_id = records
        .first()
        .and_then(|r| r["activityid"].as_str())
        .unwrap_or_default()
        .to_owned();
    let scrub = |text: String| {
        text.replace(&scenario.contact_id, "<contact>")
            .replace(&record_id, "<record>")
            .replace(bucket, "<bucket>")
    };
    let records = records
        .into_iter()
        .map(|r| serde_json::from_str(&scrub(Value::Object(r).to_string())).unwrap())
        .collect();
    let notes = notes(emulator).into_iter().map(scrub).collect();
    (records, notes)
}

struct Run {
    records: Vec<Value>,
    notes: Vec<String>,
    requests: usize,
    labels: Vec<String>,
    crashed: bool,
    dead_letters: usize,
}

/// One whole contact, in order, every request through a proxy that kills the
/// invocation after request `crash_after` has had its effect. The killed event
/// is delivered again to a new container (fresh clients and caches) once the
/// dead invocation's lock has run out, as Lambda's retry would.
async fn run_contact(crash_after: Option<usize>) -> Run {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let scenario = scenario(&aws).await;
    let proxy = CrashProxy::start(emulator.org_url(), aws_endpoint(), crash_after).await;
    let via = aws.through(proxy.url());
    let container = || Arc::new(lifecycle_via(&emulator, proxy.url(), &via, ""));
    let mut lifecycle = container();
    let mut crashed = false;
    let mut invocations: Vec<Invocation> = scenario
        .events
        .iter()
        .map(|(kind, event)| Invocation::Event(*kind, event.clone()))
        .collect();
    loop {
        for invocation in invocations.drain(..) {
            // Until it succeeds: the trigger delivers a failed or killed invocation again.
            loop {
                let running = {
                    let lifecycle = lifecycle.clone();
                    let invocation = invocation.clone();
                    tokio::spawn(async move { invocation.run(&lifecycle).await })
                };
                tokio::pin!(running);
                tokio::select! {
                    finished = &mut running => {
                        match finished.expect("the handler does not panic") {
                            Ok(()) => break,
                            Err(error) => eprintln!("redelivered after: {error}"),
                        }
                    }
                    () = proxy.crashed(), if !crashed => {
                        running.abort();
                        crashed = true;
                        tokio::time::sleep(LOCK_RUNS_OUT).await;
                        lifecycle = container();
                    }
                }
            }
        }
        // Then the retry queue (delayed closes among it), read directly: its reads
        // are the trigger's, not the function's.
        match next_retry_batch(&aws).await {
            Some((batch, _)) => invocations.push(Invocation::RetryBatch(batch)),
            None => break,
        }
    }
    let (records, notes) = normalised(&emulator, &scenario, &aws.bucket);
    Run {
        records,
        notes,
        requests: proxy.requests(),
        labels: proxy.labels(),
        crashed,
        dead_letters: aws.dead_letters().await.len(),
    }
}

/// What a trigger hands a function: one event, or a batch of the retry queue.
#[derive(Clone)]
enum Invocation {
    Event(Kind, Value),
    RetryBatch(Value),
}

impl Invocation {
    async fn run(&self, lifecycle: &Lifecycle) -> Result<(), String> {
        match self {
            Self::Event(kind, event) => handle(
                lifecycle,
                *kind,
                event.clone(),
                deadline(INVOCATION_SECONDS),
            )
            .await
            .map(drop)
            .map_err(|e| format!("{kind:?}: {e}")),
            Self::RetryBatch(batch) => {
                let answer = shared::handlers::contact_created(
                    lifecycle,
                    batch.clone(),
                    deadline(INVOCATION_SECONDS),
                )
                .await
                .map_err(|e| format!("retry batch: {e}"))?;
                // A partial failure: the queue delivers the batch's failures again (all of it here).
                match answer["batchItemFailures"].as_array() {
                    Some(failures) if !failures.is_empty() => Err(format!("retry batch: {answer}")),
                    _ => Ok(()),
                }
            }
        }
    }
}

#[tokio::test]
async fn a_crash_at_any_request_boundary_leaves_the_uninterrupted_record() {
    let reference = run_contact(None).await;
    assert_eq!(reference.records.len(), 1);
    assert_eq!(reference.dead_letters, 0);
    let boundaries = reference.requests;
    println!(
        "{boundaries} request boundaries in one lifecycle: {:?}",
        reference.labels
    );
    assert!(boundaries >= 20, "{:?}", reference.labels);

    // Every boundary at once: each run has its own emulator, tables and queues.
    let runs = futures_join_all((1..=boundaries).map(|k| async move {
        tokio::time::timeout(Duration::from_secs(120), run_contact(Some(k)))
            .await
            .unwrap_or_else(|_| panic!("the run killed after request {k} finished"))
    }))
    .await;
    for (k, run) in (1..=boundaries).zip(runs) {
        let at = reference.labels.get(k - 1).cloned().unwrap_or_default();
        assert!(run.crashed, "boundary {k} ({at}) was reached");
        assert_eq!(
            run.records, reference.records,
            "killed after request {k} ({at}): one record, equal field by field"
        );
        assert_eq!(
            run.notes, reference.notes,
            "killed after request {k} ({at})"
        );
        assert_eq!(run.dead_letters, 0, "killed after request {k} ({at})");
    }
}

/// `join_all` without another dependency: spawn every future, collect in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("a run does not panic"));
    }
    outputs
}

#[tokio::test]
async fn a_dynamics_outage_shorter_than_the_window_loses_and_repeats_nothing() {
    let reference = {
        let emulator = emulator().await;
        let aws = AwsResources::create().await;
        let lifecycle = lifecycle(&emulator, &aws, "");
        let scenario = scenario(&aws).await;
        for (kind, event) in scenario.events.clone() {
            deliver(&lifecycle, kind, event).await;
        }
        normalised(&emulator, &scenario, &aws.bucket)
    };
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    // Every event of the contact arrives while Dynamics answers 503 to everything.
    emulator.set_faults(Faults {
        unavailable_ratio: 1.0,
        ..Faults::default()
    });
    for (kind, event) in scenario.events.clone() {
        let answer = handle(&lifecycle, kind, event, deadline(3)).await;
        assert!(
            answer.is_ok(),
            "{kind:?} handed off, not failed: {answer:?}"
        );
    }
    assert!(phonecalls(&emulator).is_empty(), "nothing reached Dynamics");
    emulator.clear_faults();
    let retried = drain_retries(&lifecycle, &aws).await;
    assert!(retried >= 1);
    assert_eq!(normalised(&emulator, &scenario, &aws.bucket), reference);
    assert_eq!(notes(&emulator).len(), 1, "the note once");
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn a_token_expiring_mid_lifecycle_costs_one_refresh() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    let scenario = scenario(&aws).await;
    let mut events = scenario.events.clone().into_iter();
    let (kind, first) = events.next().unwrap();
    deliver(&lifecycle, kind, first).await;
    assert_eq!(emulator.token_requests(), 1);
    emulator.expire_tokens();
    for (kind, event) in events {
        deliver(&lifecycle, kind, event).await;
    }
    assert_eq!(drain_retries(&lifecycle, &aws).await, 0, "nothing deferred");
    assert_eq!(emulator.token_requests(), 2, "exactly one refresh");
    let refused = emulator
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .count();
    assert_eq!(refused, 1, "one request met the expired token");
    let record = &phonecalls(&emulator)[0];
    assert_eq!(record["statecode"], 1);
    assert_eq!(notes(&emulator).len(), 1);
    assert!(aws.dead_letters().await.is_empty());
}

#[tokio::test]
async fn two_containers_racing_on_the_same_events_make_one_record() {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    // Two containers: separate clients and caches, the same tables and queues.
    let first = Arc::new(lifecycle(&emulator, &aws, ""));
    let second = Arc::new(lifecycle(&emulator, &aws, ""));
    let scenario = scenario(&aws).await;
    for (kind, event) in scenario.events.clone() {
        let racers = [first.clone(), second.clone()].map(|container| {
            let event = event.clone();
            tokio::spawn(async move { deliver(&container, kind, event).await })
        });
        for racer in racers {
            racer.await.expect("no panic");
        }
    }
    drain_retries(&first, &aws).await;
    let records = phonecalls(&emulator);
    assert_eq!(records.len(), 1, "one record");
    assert_eq!(records[0]["statecode"], 1);
    assert_eq!(notes(&emulator).len(), 1, "the note once");
    let upserts = emulator
        .requests()
        .iter()
        .filter(|r| {
            r.method == "PATCH" && r.header("if-match").is_none() && r.target.contains("phonecalls")
        })
        .count();
    assert_eq!(upserts, 1, "one creating upsert");
    assert!(aws.dead_letters().await.is_empty());
}
