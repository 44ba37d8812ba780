//! The Dataverse client against the emulator over loopback.

use std::time::{Duration, Instant};

use dataverse_emulator::{Fault, Faults};
use e2e::{client, deadline, emulator};
use serde_json::json;
use shared::dataverse::batch::BatchOperation;
use shared::dataverse::odata::{EntitySet, string_literal};
use shared::dataverse::{Change, DataverseError, Query};
use uuid::Uuid;

fn set(name: &str) -> EntitySet {
    EntitySet::new(name).unwrap()
}

#[tokio::test]
async fn create_get_update_upsert_delete() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    let phonecalls = set("phonecalls");

    let id = client
        .create(
            &phonecalls,
            &json!({"subject": "Inbound call", "directioncode": false}),
            deadline(10),
        )
        .await
        .unwrap();
    let created = emulator.record("phonecalls", id).unwrap();
    assert_eq!(created["subject"], "Inbound call");

    let returned = client
        .create_returning(
            &set("contacts"),
            &json!({"firstname": "Maren", "lastname": "Holt"}),
            &["fullname"],
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(returned["fullname"], "Maren Holt");

    client
        .update(
            &phonecalls,
            id,
            &json!({"description": "answered"}),
            deadline(10),
        )
        .await
        .unwrap();
    let fetched = client
        .get(
            &phonecalls,
            id,
            &["subject".into(), "description".into()],
            deadline(10),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fetched["description"], "answered");
    assert_eq!(fetched["subject"], "Inbound call");

    // An update never creates: a missing record is a permanent 404.
    let missing = Uuid::new_v4();
    let error = client
        .update(
            &phonecalls,
            missing,
            &json!({"subject": "ghost"}),
            deadline(10),
        )
        .await
        .unwrap_err();
    assert!(error.is_not_found() && !error.is_transient(), "{error:?}");
    assert!(emulator.record("phonecalls", missing).is_none());

    // An upsert with a known id creates once and then updates the same record.
    let deterministic = Uuid::new_v5(&Uuid::NAMESPACE_URL, b"contact-1");
    for subject in ["first", "second"] {
        client
            .upsert(
                &phonecalls,
                deterministic,
                &json!({"subject": subject}),
                deadline(10),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        emulator.record("phonecalls", deterministic).unwrap()["subject"],
        "second"
    );
    assert!(
        !client
            .create_with_id(
                &phonecalls,
                deterministic,
                &json!({"subject": "x"}),
                deadline(10)
            )
            .await
            .unwrap()
    );

    assert!(client.delete(&phonecalls, id, deadline(10)).await.unwrap());
    assert!(!client.delete(&phonecalls, id, deadline(10)).await.unwrap());
    assert!(
        client
            .get(&phonecalls, id, &[], deadline(10))
            .await
            .unwrap()
            .is_none()
    );

    let log = emulator.requests();
    let updates: Vec<_> = log
        .iter()
        .filter(|r| r.method == "PATCH" && r.body.contains("answered"))
        .collect();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].header("if-match"), Some("*"));
    assert!(log.iter().all(|r| r.header("odata-version") == Some("4.0")
        && r.header("accept") == Some("application/json")));
}

#[tokio::test]
async fn filter_values_with_plus_and_quotes_match() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    emulator.seed(
        "contacts",
        json!({"lastname": "O'Shea", "telephone1": "+447700900123"}),
    );
    emulator.seed(
        "contacts",
        json!({"lastname": "Other", "telephone1": "+447700900999"}),
    );
    let query = Query {
        select: vec!["lastname".into(), "telephone1".into()],
        filter: Some(format!(
            "telephone1 eq {} and lastname eq {}",
            string_literal("+447700900123"),
            string_literal("O'Shea")
        )),
        ..Query::default()
    };
    let page = client
        .query(&set("contacts"), &query, deadline(10))
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1, "{:?}", page.records);
    assert_eq!(page.records[0]["lastname"], "O'Shea");
    let sent = emulator.requests().pop().unwrap().target;
    assert!(sent.contains("%2B447700900123"), "{sent}");
}

#[tokio::test]
async fn paging_follows_next_links() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    for n in 0..7 {
        emulator.seed("accounts", json!({"name": format!("Account {n}")}));
    }
    let query = Query {
        select: vec!["name".into()],
        page_size: Some(3),
        ..Query::default()
    };
    let mut page = client
        .query(&set("accounts"), &query, deadline(10))
        .await
        .unwrap();
    let mut names = Vec::new();
    let mut pages = 1;
    loop {
        names.extend(
            page.records
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned()),
        );
        let Some(next) = page.next_link.clone() else {
            break;
        };
        page = client
            .next_page(&next, query.page_size, deadline(10))
            .await
            .unwrap();
        pages += 1;
    }
    names.sort();
    assert_eq!(pages, 3);
    assert_eq!(
        names,
        (0..7).map(|n| format!("Account {n}")).collect::<Vec<_>>()
    );
    assert!(
        emulator
            .requests()
            .iter()
            .all(|r| r.header("prefer") == Some("odata.maxpagesize=3"))
    );
}

#[tokio::test]
async fn change_tracking_reports_changes_and_deletions_then_expires() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    let accounts = set("accounts");
    let ids: Vec<Uuid> = (0..5)
        .map(|n| emulator.seed("accounts", json!({"name": format!("A{n}")})))
        .collect();
    let select = vec!["name".to_owned()];

    let mut page = client
        .track_changes(&accounts, &select, 2, deadline(10))
        .await
        .unwrap();
    let mut initial = page.changes.len();
    while let Some(next) = page.next_link.clone() {
        assert!(
            page.delta_link.is_none(),
            "the delta link comes only on the last page"
        );
        page = client.follow_changes(&next, 2, deadline(10)).await.unwrap();
        initial += page.changes.len();
    }
    assert_eq!(initial, 5);
    let delta_link = page.delta_link.clone().unwrap();

    emulator.modify("accounts", ids[1], json!({"name": "A1 renamed"}));
    emulator.remove("accounts", ids[3]);
    let added = emulator.seed("accounts", json!({"name": "A5"}));
    let delta = client
        .follow_changes(&delta_link, 100, deadline(10))
        .await
        .unwrap();
    let mut upserted: Vec<String> = delta
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Upserted(row) => Some(row["accountid"].as_str().unwrap().to_owned()),
            Change::Deleted(_) => None,
        })
        .collect();
    upserted.sort();
    let mut expected = vec![ids[1].to_string(), added.to_string()];
    expected.sort();
    assert_eq!(upserted, expected);
    assert_eq!(delta.changes.last(), Some(&Change::Deleted(ids[3])));
    assert!(delta.delta_link.is_some());

    emulator.expire_delta_tokens();
    let error = client
        .follow_changes(&delta.delta_link.unwrap(), 100, deadline(10))
        .await
        .unwrap_err();
    assert!(
        matches!(error, DataverseError::DeltaExpired { ref code, .. } if code == "0x80044352"),
        "{error:?}"
    );
}

#[tokio::test]
async fn untracked_table_fails_loudly() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    let error = client
        .track_changes(&set("phonecalls"), &[], 10, deadline(10))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("change tracking is not enabled"),
        "{error}"
    );
}

#[tokio::test]
async fn batch_change_set_applies_all_or_nothing() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    let contacts = set("contacts");
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let operations: Vec<BatchOperation> = ids
        .iter()
        .map(|id| BatchOperation::upsert(&contacts, *id, json!({"lastname": id.to_string()})))
        .collect();
    let responses = client.batch(&operations, true, deadline(10)).await.unwrap();
    assert_eq!(responses.len(), 3);
    assert!(responses.iter().all(|r| r.is_success()), "{responses:?}");
    assert_eq!(emulator.records("contacts").len(), 3);

    // The second operation fails (update of a missing record): the first rolls back.
    let fresh = Uuid::new_v4();
    let failing = vec![
        BatchOperation::upsert(&contacts, fresh, json!({"lastname": "rolled back"})),
        BatchOperation::update(&contacts, Uuid::new_v4(), json!({"lastname": "missing"})),
    ];
    let responses = client.batch(&failing, true, deadline(10)).await.unwrap();
    assert_eq!(responses.len(), 1);
    assert!(responses[0].error().unwrap().is_not_found());
    assert!(emulator.record("contacts", fresh).is_none());

    // 1,500 operations go out as two batches.
    let many: Vec<BatchOperation> = (0..1500)
        .map(|n| BatchOperation::create(&set("accounts"), json!({"name": format!("bulk {n}")})))
        .collect();
    let responses = client.batch(&many, false, deadline(30)).await.unwrap();
    assert_eq!(responses.len(), 1500);
    assert_eq!(
        emulator
            .requests()
            .iter()
            .filter(|r| r.target.ends_with("$batch"))
            .count(),
        4
    );
}

#[tokio::test]
async fn throttle_storm_every_operation_succeeds_and_retry_after_is_honoured() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    emulator.set_faults(Faults {
        throttle_ratio: 0.3,
        retry_after_secs: 1,
        ..Faults::default()
    });
    let phonecalls = set("phonecalls");
    for n in 0..20 {
        let id = Uuid::new_v4();
        client
            .upsert(
                &phonecalls,
                id,
                &json!({"subject": format!("call {n}")}),
                deadline(60),
            )
            .await
            .unwrap();
        client
            .update(
                &phonecalls,
                id,
                &json!({"description": "done"}),
                deadline(60),
            )
            .await
            .unwrap();
    }
    let log = emulator.requests();
    let throttled = log.iter().filter(|r| r.status == 429).count();
    assert!(
        throttled >= 5,
        "a 30% storm over {} requests throttled only {throttled}",
        log.len()
    );
    assert_eq!(
        emulator.premature_requests(),
        0,
        "a request was sent before Retry-After elapsed"
    );
    assert_eq!(emulator.records("phonecalls").len(), 20);
    assert_eq!(client.stats().throttled as usize, throttled);
}

#[tokio::test]
async fn retry_after_longer_than_the_deadline_hands_back_at_once() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    emulator.push_fault(Fault::Throttle {
        retry_after_secs: 30,
    });
    let started = Instant::now();
    let error = client
        .upsert(
            &set("phonecalls"),
            Uuid::new_v4(),
            &json!({"subject": "x"}),
            deadline(2),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, DataverseError::Throttled { retry_after: Some(d) } if d == Duration::from_secs(30)),
        "{error:?}"
    );
    assert!(error.is_transient());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(emulator.requests().len(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    emulator.push_fault(Fault::Status(503));
    emulator.push_fault(Fault::Status(502));
    client
        .upsert(
            &set("phonecalls"),
            Uuid::new_v4(),
            &json!({"subject": "x"}),
            deadline(10),
        )
        .await
        .unwrap();
    let statuses: Vec<u16> = emulator.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 502, 204]);
}

#[tokio::test]
async fn expired_token_leads_to_exactly_one_refresh() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    let phonecalls = set("phonecalls");
    client
        .upsert(
            &phonecalls,
            Uuid::new_v4(),
            &json!({"subject": "a"}),
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(emulator.token_requests(), 1);
    emulator.expire_tokens();
    client
        .upsert(
            &phonecalls,
            Uuid::new_v4(),
            &json!({"subject": "b"}),
            deadline(10),
        )
        .await
        .unwrap();
    client
        .upsert(
            &phonecalls,
            Uuid::new_v4(),
            &json!({"subject": "c"}),
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(emulator.token_requests(), 2);
    let statuses: Vec<u16> = emulator.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [204, 401, 204, 204]);
}

#[tokio::test]
async fn permanent_errors_are_not_retried() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    let error = client
        .upsert(
            &set("phonecalls"),
            Uuid::new_v4(),
            &json!({"subject": "x", "colour": "blue"}),
            deadline(10),
        )
        .await
        .unwrap_err();
    match &error {
        DataverseError::Rejected {
            status, message, ..
        } => {
            assert_eq!(*status, 400);
            assert!(
                message.contains("The property 'colour' does not exist"),
                "{message}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(!error.is_transient());
    assert_eq!(emulator.requests().len(), 1);

    let long = "x".repeat(201);
    let error = client
        .upsert(
            &set("phonecalls"),
            Uuid::new_v4(),
            &json!({"subject": long}),
            deadline(10),
        )
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("maximum allowed length of '200'"),
        "{error}"
    );
}

#[tokio::test]
async fn closed_activity_refuses_updates() {
    let emulator = emulator().await;
    let client = client(&emulator, None);
    let phonecalls = set("phonecalls");
    let id = Uuid::new_v4();
    client
        .upsert(&phonecalls, id, &json!({"subject": "call"}), deadline(10))
        .await
        .unwrap();
    client
        .update(
            &phonecalls,
            id,
            &json!({"statecode": 1, "statuscode": 4}),
            deadline(10),
        )
        .await
        .unwrap();
    let error = client
        .update(
            &phonecalls,
            id,
            &json!({"description": "late"}),
            deadline(10),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, DataverseError::Rejected { status: 400, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn wrong_secret_is_a_permanent_credential_error() {
    let emulator = emulator().await;
    let config = e2e::config(&emulator);
    let http = shared::tls::TlsRoots::built_in()
        .expect("built-in roots")
        .https_client()
        .unwrap();
    let authenticator =
        shared::auth::Authenticator::new(http.clone(), config.dynamics.entra_app(), None)
            .with_secret(shared::secret::Secret::new("wrong"));
    let client = shared::dataverse::DataverseClient::new(
        http,
        config.dynamics.api_base.clone(),
        shared::token_cache::TokenCache::new(authenticator, None),
        Default::default(),
        Duration::from_secs(3),
    );
    let error = client
        .get(&set("contacts"), Uuid::new_v4(), &[], deadline(10))
        .await
        .unwrap_err();
    // Retried within the retry window (a rotation in progress looks the same), never at once.
    assert!(error.is_transient());
    assert!(error.to_string().contains("invalid_client"), "{error}");
    assert!(!format!("{error:?}").contains("wrong"));
}

#[tokio::test]
async fn certificate_credentials_sign_a_client_assertion() {
    use base64::Engine as _;
    const THUMBPRINT: &str = "3f9a1c02d4e5f60718293a4b5c6d7e8f90a1b2c3";
    let x5t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hex_bytes(THUMBPRINT));
    let emulator = e2e::emulator_with(dataverse_emulator::EmulatorOptions {
        certificate: Some(dataverse_emulator::TrustedCertificate {
            public_key_pem: include_str!("../../fixtures/test-certificate-public.pem").into(),
            x5t,
        }),
        ..Default::default()
    })
    .await;
    let yaml = e2e::config_yaml(&emulator).replace(
        "{ client_secret: { env: CONNECT_DYNAMICS_TEST_SECRET } }",
        &format!("{{ certificate: {{ thumbprint: {THUMBPRINT}, private_key: {{ env: CONNECT_DYNAMICS_TEST_KEY }} }} }}"),
    );
    let config = shared::config::Config::from_yaml(&yaml).unwrap();
    let http = shared::tls::TlsRoots::built_in()
        .expect("built-in roots")
        .https_client()
        .unwrap();
    let authenticator = shared::auth::Authenticator::new(http, config.dynamics.entra_app(), None)
        .with_secret(shared::secret::Secret::new(include_str!(
            "../../fixtures/test-certificate-key.pem"
        )));
    let token = authenticator.request_token().await.unwrap();
    assert!(token.expires_at > 0);
    assert_eq!(emulator.token_requests(), 1);

    // The same assertion flow with the wrong thumbprint is refused.
    let wrong = yaml.replace(THUMBPRINT, "00000000000000000000000000000000000000ff");
    let config = shared::config::Config::from_yaml(&wrong).unwrap();
    let http = shared::tls::TlsRoots::built_in()
        .expect("built-in roots")
        .https_client()
        .unwrap();
    let authenticator = shared::auth::Authenticator::new(http, config.dynamics.entra_app(), None)
        .with_secret(shared::secret::Secret::new(include_str!(
            "../../fixtures/test-certificate-key.pem"
        )));
    let error = authenticator.request_token().await.unwrap_err();
    assert!(
        error.is_refused_credential() && error.to_string().contains("invalid_client"),
        "{error}"
    );
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}
