//! The token cache against DynamoDB (moto_server) and the emulator's token endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use dataverse_emulator::EmulatorOptions;
use e2e::{client, deadline, dynamodb, emulator, emulator_with, token_store, token_table};
use serde_json::json;
use shared::dataverse::odata::EntitySet;
use uuid::Uuid;

#[tokio::test]
async fn a_cached_token_is_reused_across_calls_and_containers() {
    let emulator = emulator().await;
    let dynamodb = dynamodb().await;
    let table = token_table(&dynamodb).await;
    let contacts = EntitySet::new("contacts").unwrap();

    let container = client(&emulator, Some(token_store(&dynamodb, &table, &emulator)));
    for _ in 0..100 {
        container
            .get(&contacts, Uuid::new_v4(), &[], deadline(10))
            .await
            .unwrap();
    }
    assert_eq!(emulator.token_requests(), 1, "100 calls in one container");

    // A second container (fresh memory) finds the token in the table.
    let second = client(&emulator, Some(token_store(&dynamodb, &table, &emulator)));
    for _ in 0..100 {
        second
            .get(&contacts, Uuid::new_v4(), &[], deadline(10))
            .await
            .unwrap();
    }
    assert_eq!(
        emulator.token_requests(),
        1,
        "a second container reuses the shared token"
    );

    let item = dynamodb
        .scan()
        .table_name(&table)
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default();
    assert_eq!(item.len(), 1);
    let expires_at: u64 = item[0]["expires_at"].as_n().unwrap().parse().unwrap();
    let ttl: u64 = item[0]["ttl"].as_n().unwrap().parse().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The emulator's lifetimes are 3600-5400 s: the cache used expires_in, not a constant.
    assert!(
        (now + 3590..=now + 5400).contains(&expires_at),
        "expires_at {expires_at}, now {now}"
    );
    assert!(ttl > expires_at, "the item has a TTL past its expiry");
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() {
    // A 302 s token is fresh for 2 s under the 5-minute refresh margin.
    let emulator = emulator_with(EmulatorOptions {
        token_lifetime_secs: 302..=302,
        ..EmulatorOptions::default()
    })
    .await;
    let dynamodb = dynamodb().await;
    let table = token_table(&dynamodb).await;
    let container = client(&emulator, Some(token_store(&dynamodb, &table, &emulator)));
    let contacts = EntitySet::new("contacts").unwrap();
    container
        .get(&contacts, Uuid::new_v4(), &[], deadline(10))
        .await
        .unwrap();
    container
        .get(&contacts, Uuid::new_v4(), &[], deadline(10))
        .await
        .unwrap();
    assert_eq!(emulator.token_requests(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    container
        .get(&contacts, Uuid::new_v4(), &[], deadline(10))
        .await
        .unwrap();
    assert_eq!(emulator.token_requests(), 2, "refreshed ahead of expiry");
    // Dataverse never saw an expired token.
    assert!(emulator.requests().iter().all(|r| r.status != 401));
}

#[tokio::test]
async fn fifty_cold_containers_cost_one_token_request() {
    let emulator = emulator_with(EmulatorOptions {
        token_latency: Duration::from_millis(200),
        ..EmulatorOptions::default()
    })
    .await;
    let dynamodb = dynamodb().await;
    let table = token_table(&dynamodb).await;
    let containers: Vec<_> = (0..50)
        .map(|_| client(&emulator, Some(token_store(&dynamodb, &table, &emulator))))
        .collect();
    let started = Instant::now();
    let barrier = Arc::new(tokio::sync::Barrier::new(containers.len()));
    let tasks: Vec<_> = containers
        .into_iter()
        .map(|container| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                container
                    .upsert(
                        &EntitySet::new("phonecalls").unwrap(),
                        Uuid::new_v4(),
                        &json!({"subject": "cold"}),
                        deadline(20),
                    )
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    println!(
        "50 cold containers had a token after {:?}",
        started.elapsed()
    );
    assert_eq!(emulator.token_requests(), 1);
    assert_eq!(emulator.records("phonecalls").len(), 50);
}

#[tokio::test]
async fn a_dead_lease_holder_blocks_others_only_for_its_lease() {
    let emulator = emulator().await;
    let dynamodb = dynamodb().await;
    let table = token_table(&dynamodb).await;
    let store = token_store(&dynamodb, &table, &emulator).with_lease(Duration::from_secs(2));
    // A container took the lease and died before writing a token.
    let config = e2e::config(&emulator);
    let key = format!(
        "{}|{}|{}",
        config.dynamics.tenant_id, config.dynamics.client_id, config.dynamics.scope
    );
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    dynamodb
        .put_item()
        .table_name(&table)
        .set_item(Some(HashMap::from([
            ("cache_key".to_owned(), AttributeValue::S(key)),
            (
                "lease_owner".to_owned(),
                AttributeValue::S("dead-container".into()),
            ),
            (
                "lease_until".to_owned(),
                AttributeValue::N((now_ms + 2000).to_string()),
            ),
        ])))
        .send()
        .await
        .unwrap();
    let container = client(&emulator, Some(store));
    let started = Instant::now();
    container
        .get(
            &EntitySet::new("contacts").unwrap(),
            Uuid::new_v4(),
            &[],
            deadline(10),
        )
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "must respect a live lease, waited {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(4),
        "a dead lease must not block for long, waited {waited:?}"
    );
    assert_eq!(emulator.token_requests(), 1);
}

#[tokio::test]
async fn a_refused_token_is_replaced_in_the_table() {
    let emulator = emulator().await;
    let dynamodb = dynamodb().await;
    let table = token_table(&dynamodb).await;
    let first = client(&emulator, Some(token_store(&dynamodb, &table, &emulator)));
    let contacts = EntitySet::new("contacts").unwrap();
    first
        .get(&contacts, Uuid::new_v4(), &[], deadline(10))
        .await
        .unwrap();
    emulator.expire_tokens();
    first
        .get(&contacts, Uuid::new_v4(), &[], deadline(10))
        .await
        .unwrap();
    assert_eq!(emulator.token_requests(), 2);
    // Another container now gets the replacement from the table, not the refused token.
    let second = client(&emulator, Some(token_store(&dynamodb, &table, &emulator)));
    second
        .get(&contacts, Uuid::new_v4(), &[], deadline(10))
        .await
        .unwrap();
    assert_eq!(emulator.token_requests(), 2);
    assert_eq!(
        emulator
            .requests()
            .iter()
            .filter(|r| r.status == 401)
            .count(),
        1
    );
}

#[tokio::test]
async fn an_unreachable_table_falls_back_to_direct_token_requests() {
    let emulator = emulator().await;
    let roots = shared::tls::TlsRoots::built_in().expect("built-in roots");
    let config = shared::aws_http::config_loader(&roots.https_client().expect("the HTTPS client"))
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url("http://127.0.0.1:9")
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "t", "t", None, None, "t",
        ))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await;
    let unreachable = aws_sdk_dynamodb::Client::new(&config);
    let container = client(
        &emulator,
        Some(token_store(&unreachable, "missing", &emulator)),
    );
    container
        .get(
            &EntitySet::new("contacts").unwrap(),
            Uuid::new_v4(),
            &[],
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(emulator.token_requests(), 1);
}
