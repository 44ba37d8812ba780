//! `setup` against the emulator: the WebHook endpoint, its steps and change tracking,
//! idempotently.

use e2e::{client, deadline, emulator};
use shared::secret::Secret;
use shared::setup::{ENDPOINT_NAME, Setup, key_fingerprint};

fn setup<'a>(
    client: &'a shared::dataverse::DataverseClient,
    config: &'a shared::config::Config,
    key: &str,
    dry_run: bool,
) -> Setup<'a> {
    Setup {
        client,
        config,
        webhook_url: "https://q7x2k9m4.lambda-url.eu-west-1.on.aws/".into(),
        webhook_key: Secret::new(key),
        dry_run,
        deadline: deadline(30),
        requests: Vec::new(),
        writes: 0,
    }
}

#[tokio::test]
async fn dry_run_sends_nothing_and_shows_every_request() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    let config = e2e::config(&emulator);
    let mut plan = setup(&client, &config, "secret-key", true);
    plan.run().await.unwrap();
    assert!(emulator.requests().is_empty(), "a dry run sends nothing");
    assert_eq!(emulator.token_requests(), 0);
    let shown: Vec<String> = plan.requests.iter().map(ToString::to_string).collect();
    assert!(
        shown.iter().any(|r| r.starts_with("POST serviceendpoints")),
        "{shown:#?}"
    );
    assert_eq!(
        shown
            .iter()
            .filter(|r| r.starts_with("POST sdkmessageprocessingsteps"))
            .count(),
        6
    );
    assert!(
        shown.iter().all(|r| !r.contains("secret-key")),
        "the key is redacted"
    );
}

#[tokio::test]
async fn setup_registers_everything_once_and_a_second_run_writes_nothing() {
    let emulator = emulator().await;
    emulator.set_change_tracking("accounts", false);
    let client = client(&emulator, None);
    let config = e2e::config(&emulator);

    let mut first = setup(&client, &config, "key-one", false);
    first.run().await.unwrap();
    let endpoints = emulator.records("serviceendpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["name"], ENDPOINT_NAME);
    assert_eq!(endpoints[0]["authtype"], 4);
    assert_eq!(endpoints[0]["isauthvalueset"], true);
    assert_eq!(
        endpoints[0]["description"],
        format!("key-fp:{}", key_fingerprint(&Secret::new("key-one")))
    );
    let steps = emulator.records("sdkmessageprocessingsteps");
    assert_eq!(
        steps.len(),
        6,
        "Create, Update and Delete of contact and account"
    );
    assert!(
        steps
            .iter()
            .all(|s| s["mode"] == 1 && s["stage"] == 40 && s["asyncautodelete"] == true)
    );
    let update = steps
        .iter()
        .find(|s| s["name"] == "connect-dynamics: Update of contact")
        .unwrap();
    assert!(
        update["filteringattributes"]
            .as_str()
            .unwrap()
            .contains("telephone1")
    );
    assert!(
        emulator.change_tracking("accounts"),
        "change tracking enabled"
    );
    assert_eq!(
        emulator.published(),
        ["account"],
        "only the untracked entity is published"
    );
    let puts = emulator
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(puts, 1, "a tracked entity gets no PUT");

    emulator.clear_requests();
    let mut second = setup(&client, &config, "key-one", false);
    second.run().await.unwrap();
    assert_eq!(second.writes, 0, "{:#?}", second.requests);
    assert!(emulator.requests().iter().all(|r| r.method == "GET"));

    // A rotated key: one PATCH of the endpoint, nothing else.
    emulator.clear_requests();
    let mut rotated = setup(&client, &config, "key-two", false);
    rotated.run().await.unwrap();
    let writes: Vec<_> = emulator
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].method, "PATCH");
    assert!(writes[0].target.contains("serviceendpoints("));
    assert_eq!(emulator.records("sdkmessageprocessingsteps").len(), 6);
}
