//! Benchmark (not a test): the six release binaries run as Lambda runs them,
//! against a Lambda Runtime API stand-in, the Dataverse emulator (zero added
//! latency unless stated) and moto_server.
//!
//! Measures cold start (process start -> first `invocation/next`, -> first event
//! answered), binary size and peak RSS, CPU per warm event, round trips per contact
//! lifecycle (caller matched, owner mapped, warm containers), a 100-process token
//! stampede, and in-process throughput with 0 and 100 ms Dynamics latency.
//! Prints Markdown tables and writes `target/bench/lambda.json`.
//!
//! Run: `bash tests/bench lambda [contacts]` (builds the release binaries, starts moto_server).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataverse_emulator::{Emulator, EmulatorOptions, Faults};
use e2e::bench::{peak_rss_mib, write_json};
use e2e::contact::{Kind, handle, initiated_before_the_flow, retarget};
use e2e::crash_proxy::CrashProxy;
use e2e::runtime_api::RuntimeApi;
use e2e::{
    AwsResources, aws_endpoint, config_yaml_via, emulator, emulator_with, fixture, next_retry_batch,
};
use serde_json::{Value, json};

const FUNCTIONS: [&str; 6] = [
    "sync-sweep",
    "record-saved",
    "contact-created",
    "contact-answered",
    "contact-ended",
    "recording-available",
];
const SECRET_VAR: &str = "CONNECT_DYNAMICS_TEST_SECRET";
const WEBHOOK_VAR: &str = "CONNECT_DYNAMICS_TEST_WEBHOOK_KEY";
const WEBHOOK_KEY: &str = "bench-webhook-key";
const AGENT_INSTANCE: &str = "c714775e-f05f-4186-ad82-fe2ec415473e";
const AGENT: &str = "72df775f-4bad-4e6a-a431-df2e1440a45c";
const CALLER: &str = "+447700900123";
/// The close's wait for a recording here: longer than the recording takes to follow
/// the end in this run, short enough to wait for the delayed closes.
const CLOSE_GRACE_SECONDS: u64 = 2;
/// The `lambda_runtime` floor the cold starts are compared with.
const HELLO: &str = "hello-lambda";
/// Cold starts per function, interleaved; the median is reported. Single starts
/// vary by a millisecond on a shared machine, as much as the ratios' margin.
const COLD_RUNS: usize = 7;

fn release_binary(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    target.join("release").join(name)
}

/// user + system CPU seconds of a process (`/proc/<pid>/stat`, clock ticks of 10 ms).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which sits in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

struct Process {
    name: &'static str,
    child: Child,
    runtime: RuntimeApi,
    started: Instant,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn invoke(&self, event: Value) -> Value {
        match self.try_invoke(event).await {
            Ok(answer) => answer,
            Err(error) => panic!("{} answered an error: {error}", self.name),
        }
    }

    /// The answer, or the error the function answered with.
    async fn try_invoke(&self, event: Value) -> Result<Value, Value> {
        match self.runtime.invoke(event, Duration::from_secs(60)).await {
            Some(answer) => answer,
            None => panic!(
                "{} gave no answer (init error: {:?})",
                self.name,
                self.runtime.init_error()
            ),
        }
    }
}

async fn spawn(name: &'static str, env: &[(String, String)]) -> Process {
    let runtime = RuntimeApi::start().await;
    let binary = release_binary(name);
    let started = Instant::now();
    let child = Command::new(&binary)
        .envs(env.iter().cloned())
        .env("AWS_LAMBDA_RUNTIME_API", runtime.address())
        .env("AWS_LAMBDA_FUNCTION_NAME", name)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (build it: cargo build --release -p {name})",
                binary.display()
            )
        });
    Process {
        name,
        child,
        runtime,
        started,
    }
}

/// The environment the SAM template gives the functions, pointed at the stand-ins.
async fn function_env(
    emulator: &Emulator,
    aws: &AwsResources,
    endpoint: &str,
    dynamics: &str,
    contact_yaml: &str,
) -> Vec<(String, String)> {
    let yaml = format!(
        "{}contact:\n  owner_from_agent: internalemailaddress\n  close_grace_seconds: {CLOSE_GRACE_SECONDS}\n{contact_yaml}webhook:\n  key: {{ env: {WEBHOOK_VAR} }}\n",
        config_yaml_via(emulator, dynamics)
    );
    let path = std::env::temp_dir().join(format!("bench-config-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, yaml).expect("write the bench configuration");
    let checkpoints = e2e::create_table(&aws.dynamodb, "checkpoints", &["entity"]).await;
    [
        ("CONNECT_DYNAMICS_CONFIG", path.display().to_string()),
        (SECRET_VAR, emulator.options().client_secret.clone()),
        (WEBHOOK_VAR, WEBHOOK_KEY.into()),
        ("TOKEN_CACHE_TABLE", aws.token_table.clone()),
        ("CONTACT_STATE_TABLE", aws.state_table.clone()),
        ("DIRECTORY_TABLE", aws.directory_table.clone()),
        ("CHECKPOINT_TABLE", checkpoints),
        ("RETRY_QUEUE_URL", aws.retry_queue.clone()),
        ("DEAD_LETTER_QUEUE_URL", aws.dead_letter_queue.clone()),
        ("AWS_ENDPOINT_URL", endpoint.into()),
        ("AWS_ENDPOINT_URL_CONNECT", dynamics.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A voice contact's events, each with the function it goes to, for a fresh contact
/// id: the flow, `INITIATED` (started seconds before the flow ran), answered,
/// ended, and its call recording.
fn contact_events(bucket: &str) -> Vec<(&'static str, Kind, Value)> {
    let contact = uuid::Uuid::new_v4().to_string();
    let (initiated, _) = initiated_before_the_flow(&contact, bucket);
    vec![
        (
            "contact-created",
            Kind::Flow,
            retarget(fixture("connect-flow-event.json"), &contact, bucket),
        ),
        ("contact-created", Kind::Initiated, initiated),
        (
            "contact-answered",
            Kind::Answered,
            retarget(
                fixture("connect-contact-event-connected-to-agent.json"),
                &contact,
                bucket,
            ),
        ),
        (
            "contact-ended",
            Kind::Ended,
            retarget(
                fixture("connect-contact-event-disconnected.json"),
                &contact,
                bucket,
            ),
        ),
        (
            "recording-available",
            Kind::Recording,
            retarget(
                fixture("s3-object-created-connect-recording.constructed.json"),
                &contact,
                bucket,
            ),
        ),
    ]
}

/// A chat's events for a fresh contact id: the chat flow, answered, ended, and its
/// transcript (put in S3 first, as Amazon Connect writes it).
async fn chat_events(aws: &AwsResources) -> Vec<(&'static str, Kind, Value)> {
    let contact = uuid::Uuid::new_v4().to_string();
    let chat = |event: Value| {
        serde_json::from_str(&event.to_string().replace("\"VOICE\"", "\"CHAT\""))
            .expect("the event stays JSON")
    };
    let flow = retarget(
        fixture("connect-flow-event-chat.json"),
        &contact,
        &aws.bucket,
    );
    let transcript = retarget(fixture("s3-object-created.json"), &contact, &aws.bucket);
    let key = transcript["detail"]["object"]["key"]
        .as_str()
        .unwrap_or_default();
    aws.s3
        .put_object()
        .bucket(&aws.bucket)
        .key(key)
        .body(
            json!({"Transcript": [{"Content": "Hello", "ParticipantRole": "CUSTOMER", "DisplayName": "Nadia"}]})
                .to_string()
                .into_bytes()
                .into(),
        )
        .send()
        .await
        .expect("the transcript is stored");
    let event = |name: &str| chat(retarget(fixture(name), &contact, &aws.bucket));
    vec![
        ("contact-created", Kind::Flow, flow),
        (
            "contact-answered",
            Kind::Answered,
            event("connect-contact-event-connected-to-agent.json"),
        ),
        (
            "contact-ended",
            Kind::Ended,
            event("connect-contact-event-disconnected.json"),
        ),
        ("recording-available", Kind::Recording, transcript),
    ]
}

/// Runs the retry queue's messages (the delayed closes the ended step schedules,
/// due after the grace) through contact-created, as the queue's trigger would.
async fn run_delayed_closes(process: &Process, aws: &AwsResources) -> usize {
    let mut messages = 0;
    while let Some((batch, _)) = next_retry_batch(aws).await {
        messages += batch["Records"].as_array().map_or(0, Vec::len);
        process.invoke(batch).await;
    }
    messages
}

fn webhook_event(id: uuid::Uuid) -> Value {
    let body = fixture("dynamics-webhook-update.json")
        .to_string()
        .replace("374cca32-b347-4e5a-8fa6-11098c82c9a5", &id.to_string());
    json!({
        "version": "2.0",
        "rawPath": "/",
        "headers": {"content-type": "application/json"},
        "queryStringParameters": {"code": WEBHOOK_KEY},
        "requestContext": {"http": {"method": "POST"}},
        "body": body,
        "isBase64Encoded": false,
    })
}

fn scheduled_event() -> Value {
    json!({"version": "0", "id": uuid::Uuid::new_v4().to_string(), "detail-type": "Scheduled Event", "source": "aws.events", "account": "123456789012", "time": "2026-11-23T00:00:00Z", "region": "us-east-1", "resources": [], "detail": {}})
}

/// A proxy label without its query string, which can hold a whole OData filter.
fn without_query(label: &str) -> &str {
    label.split_once('?').map_or(label, |(path, _)| path)
}

/// Requests by service, from the proxy's labels.
fn by_service(labels: &[String]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for label in labels {
        let service = if label.starts_with("dynamodb") {
            "DynamoDB"
        } else if label.starts_with("sqs") {
            "SQS"
        } else if label.contains("/oauth2/") {
            "token (Entra)"
        } else if label.contains("/api/data/") {
            "Dataverse"
        } else if label.contains(" /users/") {
            "Connect DescribeUser"
        } else {
            "S3"
        };
        *counts.entry(service).or_insert(0) += 1;
    }
    counts
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Requests by service per lifecycle, for contacts given as their events (the
/// delayed closes included).
async fn requests_per_lifecycle(
    processes: &BTreeMap<&'static str, Process>,
    proxy: &CrashProxy,
    aws: &AwsResources,
    lifecycles: Vec<Vec<(&'static str, Kind, Value)>>,
) -> BTreeMap<&'static str, f64> {
    let count = lifecycles.len().max(1) as f64;
    let before = proxy.labels().len();
    for events in lifecycles {
        for (name, _, event) in events {
            processes[name].invoke(event).await;
        }
    }
    run_delayed_closes(&processes["contact-created"], aws).await;
    by_service(&proxy.labels()[before..])
        .into_iter()
        .map(|(service, requests)| (service, requests as f64 / count))
        .collect()
}

#[tokio::main]
async fn main() {
    let contacts: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let mut json_out = serde_json::Map::new();

    // ---------------------------------------------------------- deployment
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let proxy = CrashProxy::start(emulator.org_url(), aws_endpoint(), None).await;
    let env = function_env(&emulator, &aws, proxy.url(), proxy.url(), "").await;
    emulator.add_connect_user(
        AGENT_INSTANCE.parse().unwrap(),
        AGENT.parse().unwrap(),
        "ana.silva",
        Some("ana.silva@example.com"),
    );
    emulator.seed(
        "systemusers",
        json!({"fullname": "Ana Silva", "internalemailaddress": "ana.silva@example.com"}),
    );
    let customer = emulator.seed(
        "contacts",
        json!({"firstname": "Maren", "lastname": "Holt", "mobilephone": CALLER}),
    );

    // ---------------------------------------------------------- cold starts
    println!(
        "\n## Cold start (release binaries, Runtime API stand-in, median of {COLD_RUNS} starts)\n"
    );
    println!(
        "| function | binary size | to first `next` | x hello-world | to first event answered | x hello-world | peak RSS after it |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut to_poll: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut to_answer: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut rss_after: BTreeMap<&str, f64> = BTreeMap::new();
    let mut processes: BTreeMap<&'static str, Process> = BTreeMap::new();
    for _ in 0..COLD_RUNS {
        let contact = contact_events(&aws.bucket);
        for name in std::iter::once(HELLO).chain(FUNCTIONS) {
            let process = spawn(name, &env).await;
            let event = match name {
                HELLO => json!({"hello": "world"}),
                "sync-sweep" => scheduled_event(),
                "record-saved" => webhook_event(customer),
                _ => contact
                    .iter()
                    .find(|(function, _, _)| *function == name)
                    .map(|(_, _, event)| event.clone())
                    .expect("an event per lifecycle function"),
            };
            // Wait for the first poll without handing the event over yet.
            while process.runtime.first_poll().is_none() {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let polled = process.runtime.first_poll().unwrap() - process.started;
            process.invoke(event).await;
            let answered = process.started.elapsed();
            to_poll
                .entry(name)
                .or_default()
                .push(polled.as_secs_f64() * 1000.0);
            to_answer
                .entry(name)
                .or_default()
                .push(answered.as_secs_f64() * 1000.0);
            rss_after.insert(name, peak_rss_mib(process.pid()));
            // The last start of each function stays for the warm runs.
            if let Some(mut earlier) = processes.insert(name, process) {
                let _ = earlier.child.kill();
            }
        }
    }
    let hello_poll = median(&to_poll[HELLO]);
    let hello_answer = median(&to_answer[HELLO]);
    let mut cold = Vec::new();
    for name in std::iter::once(HELLO).chain(FUNCTIONS) {
        let size = std::fs::metadata(release_binary(name)).map_or(0, |m| m.len());
        let (poll, answer) = (median(&to_poll[name]), median(&to_answer[name]));
        let rss = rss_after[name];
        println!(
            "| {name} | {:.1} MB | {poll:.1} ms | {:.2} | {answer:.1} ms | {:.2} | {rss:.1} MiB |",
            size as f64 / 1e6,
            poll / hello_poll,
            answer / hello_answer,
        );
        cold.push(json!({"function": name, "binary_bytes": size, "to_first_next_ms": to_poll[name], "to_first_answer_ms": to_answer[name], "to_first_next_ratio": poll / hello_poll, "to_first_answer_ratio": answer / hello_answer, "peak_rss_mib": rss}));
    }
    json_out.insert("cold_start".into(), Value::Array(cold));
    if let Some(mut hello) = processes.remove(HELLO) {
        let _ = hello.child.kill();
    }
    // The cold contacts' delayed closes, before the warm counts start.
    run_delayed_closes(&processes["contact-created"], &aws).await;

    // ---------------------------------------------------------- warm: CPU and round trips
    let cpu_before: BTreeMap<&str, f64> = processes
        .iter()
        .map(|(name, p)| (*name, cpu_seconds(p.pid())))
        .collect();
    let labels_before = proxy.labels().len();
    let dataverse_before = emulator.requests().len();
    let tokens_before = emulator.token_requests();
    let mut wall: BTreeMap<&str, Duration> = BTreeMap::new();
    let mut calls: BTreeMap<&str, usize> = BTreeMap::new();
    for _ in 0..contacts {
        for (name, kind, event) in contact_events(&aws.bucket) {
            *calls.entry(name).or_default() += 1;
            let started = Instant::now();
            let answer = processes[name].invoke(event).await;
            *wall.entry(name).or_default() += started.elapsed();
            if kind == Kind::Flow {
                assert_eq!(answer["dynamics_status"], "created", "{answer}");
                assert_eq!(answer["dynamics_customer_matched"], "true", "{answer}");
            }
        }
    }
    // The delayed closes (nothing left to close: each recording's write closed its record).
    let delayed_closes = run_delayed_closes(&processes["contact-created"], &aws).await;
    let lifecycle_labels: Vec<String> = proxy.labels()[labels_before..].to_vec();
    let lifecycle_dataverse = emulator.requests().len() - dataverse_before;
    let lifecycle_tokens = emulator.token_requests() - tokens_before;
    for _ in 0..contacts {
        let started = Instant::now();
        processes["record-saved"]
            .invoke(webhook_event(customer))
            .await;
        *wall.entry("record-saved").or_default() += started.elapsed();
    }
    let sweeps = 20.min(contacts);
    for _ in 0..sweeps {
        let started = Instant::now();
        processes["sync-sweep"].invoke(scheduled_event()).await;
        *wall.entry("sync-sweep").or_default() += started.elapsed();
    }

    println!("\n## Warm events ({contacts} contacts; {sweeps} delta sweeps)\n");
    println!(
        "| function | CPU per event | events/s per core (CPU bound) | wall per event (with moto_server) | peak RSS |"
    );
    println!("|---|---|---|---|---|");
    let mut warm = Vec::new();
    for name in FUNCTIONS {
        let process = &processes[name];
        let events = match name {
            "sync-sweep" => sweeps,
            "record-saved" => contacts,
            // contact-created takes the flow and INITIATED: two events a contact.
            _ => calls.get(name).copied().unwrap_or(contacts),
        };
        let cpu = (cpu_seconds(process.pid()) - cpu_before[name]) / events as f64;
        let wall_ms = wall[name].as_secs_f64() * 1000.0 / events as f64;
        let rss = peak_rss_mib(process.pid());
        println!(
            "| {name} | {:.2} ms | {:.0} | {wall_ms:.1} ms | {rss:.1} MiB |",
            cpu * 1000.0,
            if cpu > 0.0 { 1.0 / cpu } else { f64::INFINITY }
        );
        warm.push(json!({"function": name, "events": events, "cpu_ms_per_event": cpu * 1000.0, "wall_ms_per_event": wall_ms, "peak_rss_mib": rss}));
    }
    json_out.insert("warm".into(), Value::Array(warm));

    // The other kinds of contact, fewer of each.
    let others = 20.min(contacts);
    let mut unrecorded = Vec::new();
    let mut chats = Vec::new();
    for _ in 0..others {
        let mut voice = contact_events(&aws.bucket);
        voice.pop();
        unrecorded.push(voice);
        chats.push(chat_events(&aws).await);
    }
    let kinds = [
        (
            format!("voice + recording ({contacts})"),
            by_service(&lifecycle_labels)
                .into_iter()
                .map(|(service, count)| (service, count as f64 / contacts as f64))
                .collect(),
        ),
        (
            format!("voice, no recording ({others})"),
            requests_per_lifecycle(&processes, &proxy, &aws, unrecorded).await,
        ),
        (
            format!("chat + transcript ({others})"),
            requests_per_lifecycle(&processes, &proxy, &aws, chats).await,
        ),
    ];
    println!(
        "\n## Round trips per contact lifecycle (warm, caller matched, owner mapped; close grace {CLOSE_GRACE_SECONDS} s)\n"
    );
    let services: std::collections::BTreeSet<&str> = kinds
        .iter()
        .flat_map(|(_, counts): &(String, BTreeMap<&str, f64>)| counts.keys().copied())
        .collect();
    println!(
        "| service | {} |",
        kinds
            .iter()
            .map(|(kind, _)| kind.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(kinds.len()));
    let mut trips = serde_json::Map::new();
    for service in services {
        let row: Vec<String> = kinds
            .iter()
            .map(|(_, counts)| format!("{:.2}", counts.get(service).copied().unwrap_or(0.0)))
            .collect();
        println!("| {service} | {} |", row.join(" | "));
    }
    for (kind, counts) in &kinds {
        trips.insert(kind.clone(), json!(counts));
    }
    println!(
        "(voice + recording: Dataverse as logged by the emulator {:.2}; token requests {lifecycle_tokens} in all; {delayed_closes} delayed closes run)",
        lifecycle_dataverse as f64 / contacts as f64
    );

    // One more warm lifecycle, request by request, to show what the counts are made of.
    println!("\nOne warm lifecycle, request by request:\n");
    println!("| function | request |");
    println!("|---|---|");
    let mut one = Vec::new();
    let mut steps: Vec<(&str, Option<Value>)> = contact_events(&aws.bucket)
        .into_iter()
        .map(|(name, _, event)| (name, Some(event)))
        .collect();
    steps.push(("contact-created (the delayed close)", None));
    for (name, event) in steps {
        let before = proxy.labels().len();
        match event {
            Some(event) => {
                processes[name].invoke(event).await;
            }
            None => {
                run_delayed_closes(&processes["contact-created"], &aws).await;
            }
        }
        for label in &proxy.labels()[before..] {
            let request = without_query(label);
            println!("| {name} | `{request}` |");
            one.push(json!({"function": name, "request": request}));
        }
    }
    trips.insert("one_lifecycle".into(), Value::Array(one));
    json_out.insert("round_trips_per_lifecycle".into(), Value::Object(trips));
    for (_, mut process) in processes {
        let _ = process.child.kill();
    }

    // ---------------------------------------------------------- token stampede
    let stampede = stampede().await;
    json_out.insert("token_stampede".into(), stampede);

    // ---------------------------------------------------------- in-process throughput
    let throughput = throughput().await;
    json_out.insert("throughput".into(), throughput);

    write_json("lambda.json", &Value::Object(json_out));
}

/// 100 contact-created processes start at once with an empty token cache; each
/// gets a flow event for its own contact.
async fn stampede() -> Value {
    const PROCESSES: usize = 100;
    let emulator = emulator_with(EmulatorOptions {
        token_latency: Duration::from_millis(200),
        ..EmulatorOptions::default()
    })
    .await;
    let fresh = AwsResources::create().await;
    // moto_server answers one request at a time (as DynamoDB's conditional writes
    // need): 100 processes polling it for the token outlast the flow's default
    // 3 s, so the stampede gives the flow Amazon Connect's longest wait.
    let env = function_env(
        &emulator,
        &fresh,
        &aws_endpoint(),
        &emulator.org_url(),
        "  flow_budget_ms: 7000\n",
    )
    .await;
    let started = Instant::now();
    let mut processes = Vec::new();
    for _ in 0..PROCESSES {
        processes.push(Arc::new(spawn("contact-created", &env).await));
    }
    let spawned = started.elapsed();
    let mut tasks = tokio::task::JoinSet::new();
    for process in &processes {
        let process = process.clone();
        let event = contact_events(&fresh.bucket).remove(0).2;
        tasks.spawn(async move {
            // 100 processes at once can outlast the flow's budget on a small machine:
            // the error the flow would see is counted, not fatal to the benchmark.
            let status = match process.try_invoke(event).await {
                Ok(answer) => answer["dynamics_status"].as_str().unwrap_or("?").to_owned(),
                Err(error) => format!("error {}", error["errorType"].as_str().unwrap_or("?")),
            };
            (status, Instant::now())
        });
    }
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut last = started;
    while let Some(result) = tasks.join_next().await {
        let (status, at) = result.expect("no panic");
        *statuses.entry(status).or_default() += 1;
        last = last.max(at);
    }
    let all = last - started;
    let tokens = emulator.token_requests();
    println!(
        "\n## Token stampede ({PROCESSES} contact-created processes, empty token cache, 200 ms Entra latency)\n"
    );
    println!(
        "| token requests | all processes spawned after | all answered (created with a token) after | answers |"
    );
    println!("|---|---|---|---|");
    println!(
        "| {tokens} | {:.0} ms | {:.0} ms | {statuses:?} |",
        spawned.as_secs_f64() * 1000.0,
        all.as_secs_f64() * 1000.0
    );
    for process in processes {
        if let Ok(mut process) = Arc::try_unwrap(process) {
            let _ = process.child.kill();
        }
    }
    json!({"processes": PROCESSES, "token_requests": tokens, "spawned_ms": spawned.as_secs_f64() * 1000.0, "all_answered_ms": all.as_secs_f64() * 1000.0, "statuses": statuses})
}

/// Where the throughput runs keep contact state, the directory and the retry queue.
#[derive(Clone, Copy)]
enum Stores {
    /// DynamoDB and SQS in moto_server, as deployed.
    Moto,
    /// In memory: what the function's own code and the emulator sustain.
    Memory,
}

impl Stores {
    fn label(self) -> &'static str {
        match self {
            Stores::Moto => "moto_server",
            Stores::Memory => "in memory",
        }
    }
}

/// One warm container's handler code in-process: contact creations at several
/// concurrency levels, with 0 and 100 ms added to every Dynamics request.
async fn throughput() -> Value {
    println!(
        "\n## Throughput of one container (in-process handler, contact creation from the flow)\n"
    );
    println!(
        "| state, directory, queue | Dynamics latency | concurrent events | events/s | mean latency | in flight (events/s x latency) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let runs = [
        (Stores::Moto, 0u64),
        (Stores::Moto, 100),
        (Stores::Memory, 0),
        (Stores::Memory, 100),
    ];
    for (stores, latency_ms) in runs {
        // A deployment of its own: the directory of the first one names customers
        // this emulator does not hold.
        let emulator = emulator().await;
        let aws = &AwsResources::create().await;
        let lifecycle = Arc::new(match stores {
            Stores::Moto => e2e::lifecycle(&emulator, aws, ""),
            Stores::Memory => shared::services::local_lifecycle(
                shared::config::Config::from_yaml(&e2e::config_yaml(&emulator))
                    .expect("the bench configuration is valid"),
                shared::secret::Secret::new(emulator.options().client_secret.as_str()),
                Default::default(),
                "bench",
            )
            .expect("a local lifecycle"),
        });
        // Warm: token and clients ready.
        handle(
            &lifecycle,
            Kind::Flow,
            contact_events(&aws.bucket).remove(0).2,
            e2e::deadline(8),
        )
        .await
        .expect("warm-up");
        emulator.set_faults(Faults {
            latency: Duration::from_millis(latency_ms),
            ..Faults::default()
        });
        for concurrency in [1usize, 10, 50] {
            let events = concurrency * 4;
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            let queue = Arc::new(std::sync::Mutex::new(
                (0..events)
                    .map(|_| contact_events(&aws.bucket).remove(0).2)
                    .collect::<Vec<_>>(),
            ));
            let total_latency = Arc::new(std::sync::Mutex::new(Duration::ZERO));
            for _ in 0..concurrency {
                let lifecycle = lifecycle.clone();
                let queue = queue.clone();
                let total_latency = total_latency.clone();
                tasks.spawn(async move {
                    loop {
                        let Some(event) = queue.lock().unwrap().pop() else {
                            break;
                        };
                        let began = Instant::now();
                        let answer = handle(&lifecycle, Kind::Flow, event, e2e::deadline(8))
                            .await
                            .expect("handled");
                        assert_eq!(answer["dynamics_status"], "created", "{answer}");
                        *total_latency.lock().unwrap() += began.elapsed();
                    }
                });
            }
            while let Some(finished) = tasks.join_next().await {
                finished.expect("every event handled");
            }
            let elapsed = started.elapsed().as_secs_f64();
            let rate = events as f64 / elapsed;
            let mean = total_latency.lock().unwrap().as_secs_f64() / events as f64;
            println!(
                "| {} | {latency_ms} ms | {concurrency} | {rate:.0} | {:.1} ms | {:.1} |",
                stores.label(),
                mean * 1000.0,
                rate * mean
            );
            rows.push(json!({"stores": stores.label(), "dynamics_latency_ms": latency_ms, "concurrency": concurrency, "events_per_second": rate, "mean_latency_ms": mean * 1000.0}));
        }
    }
    Value::Array(rows)
}
