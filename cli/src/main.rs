//! `connect-dynamics`: operator commands.
//!
//! - `validate <config.yaml> [--live]`: check a configuration document, naming the exact key of
//!   any error; with `--live`, also the record templates' columns against the org's table
//!   definitions (unknown columns, wrong types, text too long, options that do not exist).
//! - `preview <created|answered|ended|recording> [--event FILE] [--config FILE]`: the exact
//!   HTTP requests a step sends for a sample event (token redacted), or the exact error.
//! - `simulate [--config FILE] [--live]`: a whole contact through the real handlers against
//!   an embedded Dataverse emulator (or, with `--live`, the org the config names); prints
//!   every request and the final record.
//! - `setup --config FILE --webhook-url URL [--dry-run] [--emulator]`: registers the
//!   record-saved WebHook and its steps, and enables change tracking, through the Web API.

mod samples;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dataverse_emulator::{Emulator, EmulatorOptions, LoggedRequest};
use serde_json::Value;
use shared::config::Config;
use shared::handlers;
use shared::lifecycle::Lifecycle;
use shared::secret::Secret;

const USAGE: &str = "usage:
  connect-dynamics validate <config.yaml> [--live]
  connect-dynamics preview <created|answered|ended|recording> [--event FILE] [--config FILE]
  connect-dynamics simulate [--config FILE] [--live]
  connect-dynamics setup --config FILE --webhook-url URL [--dry-run] [--emulator]";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("validate") => validate(&args[1..]).await,
        Some("preview") => preview(&args[1..]).await,
        Some("simulate") => simulate(&args[1..]).await,
        Some("setup") => setup(&args[1..]).await,
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The value after `--name`, if given.
fn option(args: &[String], name: &str) -> Result<Option<String>, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(index) => args
            .get(index + 1)
            .cloned()
            .map(Some)
            .ok_or_else(|| format!("{name} needs a value")),
    }
}

async fn validate(args: &[String]) -> Result<(), String> {
    let path = args.iter().find(|a| !a.starts_with("--")).ok_or(USAGE)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let config = Config::from_yaml(&text).map_err(|e| e.to_string())?;
    if args.iter().any(|a| a == "--live") {
        return validate_live(config).await;
    }
    println!("{path} is valid");
    println!("  Dynamics:   {}", config.dynamics.org_url);
    println!(
        "  record:     {} ({})",
        config.contact.logical_name, config.contact.entity_set
    );
    let entities: Vec<&str> = config
        .directory
        .iter()
        .map(|m| m.logical_name.as_str())
        .collect();
    println!("  directory:  {}", entities.join(", "));
    Ok(())
}

/// The record templates against the org's table definitions: what Dataverse would refuse.
async fn validate_live(config: Config) -> Result<(), String> {
    let secret = resolve_credential(&config).await?;
    let lifecycle = shared::services::local_lifecycle(config, secret, samples::agents(), "cli")
        .map_err(|e| e.to_string())?;
    let config = &lifecycle.config;
    let findings = shared::schema_check::check_record_templates(
        config,
        &lifecycle.dataverse,
        Instant::now() + Duration::from_secs(60),
    )
    .await
    .map_err(|e| e.to_string())?;
    if findings.is_empty() {
        println!(
            "the templates' columns fit {} in {}",
            config.contact.logical_name, config.dynamics.org_url
        );
        return Ok(());
    }
    for finding in &findings {
        println!("{finding}");
    }
    Err(format!(
        "{} template column(s) Dynamics would refuse",
        findings.len()
    ))
}

/// The client secret (or certificate key) the configuration points at.
async fn resolve_credential(config: &Config) -> Result<Secret, String> {
    shared::services::resolve_secret(config.dynamics.credential.secret())
        .await
        .map_err(|e| e.to_string())
}

/// The emulator's connection settings on top of a configuration document's
/// behaviour (templates, record, directory): nothing leaves this machine.
fn local_config(emulator: &Emulator, user_yaml: Option<&str>) -> Result<Config, String> {
    // Without a configuration of its own the run shows the optional owner mapping too.
    let dynamics = format!(
        "dynamics:\n  url: {}\n  token_url: {}\n  tenant_id: {}\n  client_id: {}\n  credential: {{ client_secret: {{ env: UNUSED_LOCALLY }} }}\ncontact:\n  owner_from_agent: internalemailaddress\n",
        emulator.org_url(),
        emulator.token_url(),
        emulator.options().tenant_id,
        emulator.options().client_id
    );
    let local = Config::from_yaml(&dynamics).map_err(|e| e.to_string())?;
    let Some(user_yaml) = user_yaml else {
        return Ok(local);
    };
    let mut config = Config::from_yaml(user_yaml).map_err(|e| e.to_string())?;
    config.dynamics = local.dynamics;
    Ok(config)
}

async fn local_run(config_path: Option<String>) -> Result<(Emulator, Lifecycle), String> {
    let emulator = Emulator::start(EmulatorOptions::default())
        .await
        .map_err(|e| format!("cannot start the embedded emulator: {e}"))?;
    let user_yaml = config_path
        .map(|path| std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}")))
        .transpose()?;
    let config = local_config(&emulator, user_yaml.as_deref())?;
    // The sample agent's Dynamics user, for the owner mapping.
    let agent = samples::AGENT;
    emulator.seed(
        "systemusers",
        serde_json::json!({"fullname": agent.name, "internalemailaddress": agent.email, "domainname": agent.email}),
    );
    let secret = Secret::new(emulator.options().client_secret.as_str());
    let lifecycle = shared::services::local_lifecycle(config, secret, samples::agents(), "cli")
        .map_err(|e| e.to_string())?;
    Ok((emulator, lifecycle))
}

fn print_request(request: &LoggedRequest) {
    println!(
        "  {} {}  -> {}",
        request.method, request.target, request.status
    );
    for name in ["If-Match", "If-None-Match", "Prefer", "Content-Type"] {
        if let Some(value) = request.header(name) {
            println!("    {name}: {value}");
        }
    }
    if request.header("authorization").is_some() {
        println!("    Authorization: Bearer <redacted>");
    }
    if !request.body.is_empty() {
        let pretty = serde_json::from_str::<Value>(&request.body)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or_else(|_| request.body.clone());
        for line in pretty.lines() {
            println!("    {line}");
        }
    }
}

async fn deliver(lifecycle: &Lifecycle, event: &samples::Event) -> Result<Value, String> {
    let deadline = Instant::now() + Duration::from_secs(8);
    let result = match event.kind {
        samples::Kind::Flow | samples::Kind::Initiated => {
            handlers::contact_created(lifecycle, event.payload.clone(), deadline).await
        }
        samples::Kind::Answered | samples::Kind::Ended => {
            handlers::contact_event(lifecycle, event.payload.clone(), deadline).await
        }
        samples::Kind::Recording => {
            handlers::recording_available(lifecycle, event.payload.clone(), deadline).await
        }
    };
    result.map_err(|e| e.to_string())
}

fn report_dead_letters(lifecycle: &Lifecycle) -> Result<(), String> {
    let letters = lifecycle.handoff.dead_letters();
    if letters.is_empty() {
        return Ok(());
    }
    for letter in &letters {
        println!(
            "  dead-lettered ({}): {}",
            letter.step.as_deref().unwrap_or("event"),
            letter.reason
        );
    }
    Err(format!("{} event(s) could not be applied", letters.len()))
}

async fn preview(args: &[String]) -> Result<(), String> {
    let step = args.first().ok_or(USAGE)?.as_str();
    let (emulator, lifecycle) = local_run(option(args, "--config")?).await?;
    let mut events = samples::contact();
    let target = match step {
        "created" => samples::Kind::Flow,
        "answered" => samples::Kind::Answered,
        "ended" => samples::Kind::Ended,
        "recording" => samples::Kind::Recording,
        other => {
            return Err(format!(
                "unknown step `{other}` (created, answered, ended or recording)"
            ));
        }
    };
    if let Some(path) = option(args, "--event")? {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let payload: Value =
            serde_json::from_str(&text).map_err(|e| format!("{path}: not JSON: {e}"))?;
        if let Some(event) = events.iter_mut().find(|e| e.kind == target) {
            event.payload = payload;
        }
    }
    // The steps before the previewed one run first, as they would in Amazon Connect.
    let position = events.iter().position(|e| e.kind == target).unwrap_or(0);
    for event in &events[..position] {
        deliver(&lifecycle, event).await?;
    }
    emulator.clear_requests();
    let answer = deliver(&lifecycle, &events[position]).await?;
    println!("{step}: the requests this step sends to Dynamics\n");
    for request in emulator.requests() {
        print_request(&request);
    }
    // The ended step holds the close for the contact's file: show what closes it
    // when none comes within the grace.
    while let Some(message) = lifecycle
        .handoff
        .take_retry::<shared::handoff::RetryMessage>()
        .filter(|message| message.close_due)
    {
        println!(
            "\n{step}: the close waits up to {} s (contact.close_grace_seconds) for the recording or \
             transcript, whose write then carries it; with no file by then, the close alone:\n",
            lifecycle.config.contact.close_grace.as_secs()
        );
        emulator.clear_requests();
        let deadline = Instant::now() + Duration::from_secs(8);
        lifecycle
            .process(message, deadline, None)
            .await
            .map_err(|e| e.to_string())?;
        for request in emulator.requests() {
            print_request(&request);
        }
    }
    if target == samples::Kind::Flow {
        println!("\n  answer to the contact flow:");
        println!(
            "    {}",
            serde_json::to_string_pretty(&answer)
                .unwrap_or_default()
                .replace('\n', "\n    ")
        );
    }
    report_dead_letters(&lifecycle)
}

async fn simulate(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--live") {
        return simulate_live(args).await;
    }
    let (emulator, lifecycle) = local_run(option(args, "--config")?).await?;
    println!("Embedded Dataverse emulator: {}\n", emulator.org_url());

    // Dynamics -> directory: a customer is saved in Dynamics, the webhook reports it,
    // and the sweep reconciles the rest.
    let webhook_key = Secret::new(uuid::Uuid::new_v4().simple().to_string());
    let sync = shared::services::local_directory_sync(&lifecycle, &webhook_key);
    let customer = emulator.seed(
        "contacts",
        serde_json::json!({"firstname": "Maren", "lastname": "Holt", "mobilephone": "+44 7700 900123"}),
    );
    emulator.seed(
        "accounts",
        serde_json::json!({"name": "Juniper Lane Dental", "telephone1": "+1 206 555 0158"}),
    );
    emulator.clear_requests();
    println!(
        "== Dynamics: contact Maren Holt (+44 7700 900123) saved; the webhook calls record-saved =="
    );
    let answer = sync
        .record_saved(
            shared::directory_sync::WebhookRequest {
                code: Some(webhook_key.expose().to_owned()),
                header: None,
                body: samples::webhook_update(customer),
            },
            Instant::now() + Duration::from_secs(20),
        )
        .await;
    for request in emulator.requests() {
        print_request(&request);
    }
    println!("  answer to Dynamics: {} {}\n", answer.status, answer.body);
    emulator.clear_requests();
    println!("== sync-sweep: change tracking catches what webhooks missed ==");
    let reports = sync
        .sweep(Instant::now() + Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())?;
    for request in emulator.requests() {
        println!(
            "  {} {}  -> {}",
            request.method, request.target, request.status
        );
    }
    for report in &reports {
        println!(
            "  {}: {} upserted, {} deleted, {} removed as unseen (full reconciliation: {})",
            report.entity,
            report.upserted,
            report.deleted,
            report.removed_unseen,
            report.full_reconciliation
        );
    }
    println!();

    let events = samples::contact();
    for event in &events {
        emulator.clear_requests();
        println!("== {} ==", event.title);
        let answer = deliver(&lifecycle, event).await?;
        for request in emulator.requests() {
            print_request(&request);
        }
        if event.kind == samples::Kind::Flow {
            println!("  answer to the contact flow: {answer}");
        }
        println!();
    }
    // Work handed off (none, unless Dynamics failed) runs as the retry queue would run it.
    while let Some(message) = lifecycle
        .handoff
        .take_retry::<shared::handoff::RetryMessage>()
    {
        if message.close_due {
            println!(
                "== the close's grace ends (the recording's write already closed the record) =="
            );
        } else {
            println!("== retry: {} ==", message.reason);
        }
        let deadline = Instant::now() + Duration::from_secs(8);
        lifecycle
            .process(message, deadline, None)
            .await
            .map_err(|e| e.to_string())?;
    }
    println!("== the Dynamics record ==");
    for record in emulator.records(lifecycle.config.contact.entity_set.as_str()) {
        println!(
            "{}",
            serde_json::to_string_pretty(&record).unwrap_or_default()
        );
    }
    println!(
        "\n{} events, {} token request(s)",
        events.len(),
        emulator.token_requests()
    );
    report_dead_letters(&lifecycle)
}

/// Prepares the Dynamics side. With `--emulator`, against an embedded emulator
/// (to see what it does); with `--dry-run`, prints every request and sends nothing.
async fn setup(args: &[String]) -> Result<(), String> {
    let path = option(args, "--config")?.ok_or("setup needs --config FILE")?;
    let webhook_url = option(args, "--webhook-url")?
        .ok_or("setup needs --webhook-url (the stack's WebhookUrl output)")?;
    let dry_run = args.iter().any(|a| a == "--dry-run");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let (emulator, config, secret) = if args.iter().any(|a| a == "--emulator") {
        let emulator = Emulator::start(EmulatorOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let config = local_config(&emulator, Some(&text))?;
        let secret = Secret::new(emulator.options().client_secret.as_str());
        (Some(emulator), config, secret)
    } else {
        let config = Config::from_yaml(&text).map_err(|e| e.to_string())?;
        let secret = if dry_run {
            Secret::new("unused in a dry run")
        } else {
            resolve_credential(&config).await?
        };
        (None, config, secret)
    };
    let webhook_key = match (&config.webhook, dry_run || emulator.is_some()) {
        (Some(webhook), false) => shared::services::resolve_secret(&webhook.key)
            .await
            .map_err(|e| e.to_string())?,
        (None, false) => return Err("the configuration has no `webhook.key`".into()),
        (_, true) => Secret::new("redacted-in-this-run"),
    };
    let lifecycle = shared::services::local_lifecycle(config, secret, samples::agents(), "cli")
        .map_err(|e| e.to_string())?;
    let mut run = shared::setup::Setup {
        client: &lifecycle.dataverse,
        config: &lifecycle.config,
        webhook_url,
        webhook_key,
        dry_run,
        deadline: Instant::now() + Duration::from_secs(120),
        requests: Vec::new(),
        writes: 0,
    };
    let result = run.run().await;
    for request in &run.requests {
        println!("{request}");
    }
    result.map_err(|e| e.to_string())?;
    let verb = if dry_run { "would write" } else { "wrote" };
    println!(
        "\nsetup {verb} {} change(s){}",
        run.writes,
        if emulator.is_some() {
            " (embedded emulator)"
        } else {
            ""
        }
    );
    Ok(())
}

/// A whole contact against the org the configuration names (in-memory state, no AWS):
/// for trying templates on a real sandbox org before deploying.
async fn simulate_live(args: &[String]) -> Result<(), String> {
    let path = option(args, "--config")?.ok_or("--live needs --config FILE")?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let config = Config::from_yaml(&text).map_err(|e| e.to_string())?;
    let secret = resolve_credential(&config).await?;
    let lifecycle = shared::services::local_lifecycle(config, secret, samples::agents(), "cli")
        .map_err(|e| e.to_string())?;
    println!("Live organisation: {}\n", lifecycle.config.dynamics.org_url);
    let mut record = None;
    for event in &samples::contact() {
        let before = lifecycle.dataverse.stats().requests;
        let answer = deliver(&lifecycle, event).await?;
        println!(
            "== {} == {} request(s)",
            event.title,
            lifecycle.dataverse.stats().requests - before
        );
        if event.kind == samples::Kind::Flow {
            println!("  answer to the contact flow: {answer}");
            record = answer["dynamics_record_id"]
                .as_str()
                .and_then(|id| uuid::Uuid::parse_str(id).ok());
        }
    }
    report_dead_letters(&lifecycle)?;
    let record = record.ok_or("the flow answered without a record id")?;
    let fetched = lifecycle
        .dataverse
        .get(
            &lifecycle.config.contact.entity_set,
            record,
            &[],
            Instant::now() + Duration::from_secs(20),
        )
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "\n== the Dynamics record ==\n{}",
        serde_json::to_string_pretty(&fetched).unwrap_or_default()
    );
    Ok(())
}
