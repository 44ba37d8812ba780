//! Properties of the deployment template that cfn-lint does not check: every
//! dead letter has somewhere to go, every log is kept for a bounded time, and the
//! public webhook cannot take the concurrency the contact flow needs.

use serde_norway::Value;

fn template() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/template.yaml");
    serde_norway::from_str(&std::fs::read_to_string(path).expect("infra/template.yaml"))
        .expect("the template is YAML")
}

/// The resources of `kind`, by logical id.
fn resources<'a>(template: &'a Value, kind: &str) -> Vec<(&'a str, &'a Value)> {
    template["Resources"]
        .as_mapping()
        .expect("Resources")
        .iter()
        .filter(|(_, resource)| resource["Type"].as_str() == Some(kind))
        .filter_map(|(id, resource)| Some((id.as_str()?, resource)))
        .collect()
}

/// The logical id a `!GetAtt Id.Attr`, `!Ref Id` or `!Sub "...${Id}..."` names.
fn referenced(value: &Value) -> Option<String> {
    let Value::Tagged(tagged) = value else {
        return None;
    };
    let text = tagged.value.as_str()?;
    match tagged.tag.to_string().as_str() {
        "!GetAtt" => text.split('.').next().map(str::to_owned),
        "!Ref" => Some(text.to_owned()),
        "!Sub" => {
            let start = text.find("${")? + 2;
            let end = start + text[start..].find('}')?;
            Some(text[start..end].to_owned())
        }
        _ => None,
    }
}

#[test]
fn every_rule_dead_letter_queue_lets_eventbridge_send_from_this_stack_only() {
    let template = template();
    let policies = resources(&template, "AWS::SQS::QueuePolicy");
    let mut checked = 0;
    for (function, resource) in resources(&template, "AWS::Serverless::Function") {
        let events = resource["Properties"]["Events"].as_mapping();
        for (name, event) in events.into_iter().flatten() {
            let Some(queue) = referenced(&event["Properties"]["DeadLetterConfig"]["Arn"]) else {
                continue;
            };
            checked += 1;
            let allowed = policies.iter().any(|(_, policy)| {
                let properties = &policy["Properties"];
                let covers_queue = properties["Queues"].as_sequence().is_some_and(|queues| {
                    queues
                        .iter()
                        .any(|q| referenced(q).as_deref() == Some(&queue))
                });
                covers_queue
                    && properties["PolicyDocument"]["Statement"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|statement| {
                            statement["Principal"]["Service"].as_str()
                                == Some("events.amazonaws.com")
                                && statement["Action"].as_str() == Some("sqs:SendMessage")
                                && !statement["Condition"]["ArnLike"]["aws:SourceArn"].is_null()
                        })
            });
            assert!(
                allowed,
                "{function}.{name:?}: {queue} has no policy letting this stack's rules send"
            );
        }
    }
    assert!(checked >= 4, "rules with dead-letter queues: {checked}");
}

#[test]
fn every_function_invoked_asynchronously_has_an_on_failure_destination() {
    let template = template();
    for (function, resource) in resources(&template, "AWS::Serverless::Function") {
        let properties = &resource["Properties"];
        let asynchronous =
            properties["Events"]
                .as_mapping()
                .into_iter()
                .flatten()
                .any(|(_, event)| {
                    matches!(
                        event["Type"].as_str(),
                        Some("EventBridgeRule" | "ScheduleV2")
                    )
                });
        if asynchronous {
            let destination =
                &properties["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]["Destination"];
            assert!(
                referenced(destination).is_some(),
                "{function} is invoked asynchronously without an on-failure destination"
            );
        }
    }
}

#[test]
fn every_function_logs_to_a_log_group_with_a_retention() {
    let template = template();
    let groups = resources(&template, "AWS::Logs::LogGroup");
    for (function, resource) in resources(&template, "AWS::Serverless::Function") {
        let group = referenced(&resource["Properties"]["LoggingConfig"]["LogGroup"]);
        let retention = groups
            .iter()
            .find(|(id, _)| Some(*id) == group.as_deref())
            .map(|(_, group)| referenced(&group["Properties"]["RetentionInDays"]));
        assert_eq!(
            retention,
            Some(Some("LogRetentionDays".to_owned())),
            "{function} needs a log group of its own kept LogRetentionDays"
        );
    }
}

#[test]
fn the_public_webhook_has_a_concurrency_cap_of_its_own() {
    let template = template();
    for (function, resource) in resources(&template, "AWS::Serverless::Function") {
        let properties = &resource["Properties"];
        if properties["FunctionUrlConfig"]["AuthType"].as_str() == Some("NONE") {
            assert!(
                !properties["ReservedConcurrentExecutions"].is_null(),
                "{function} has a public URL and no reserved concurrency"
            );
        }
    }
}

/// Every function that brings a contact up to date may make its transcript's note,
/// so each can read the recording bucket, encrypted with a customer-managed key or not.
#[test]
fn every_lifecycle_function_can_read_the_recording_bucket() {
    let template = template();
    assert!(!template["Parameters"]["RecordingBucketKmsKeyArn"].is_null());
    let functions = resources(&template, "AWS::Serverless::Function");
    for id in [
        "ContactCreatedFunction",
        "ContactAnsweredFunction",
        "ContactEndedFunction",
        "RecordingAvailableFunction",
    ] {
        let (_, function) = functions
            .iter()
            .find(|(logical, _)| *logical == id)
            .unwrap_or_else(|| panic!("{id}"));
        let policies =
            serde_norway::to_string(&function["Properties"]["Policies"]).unwrap_or_default();
        assert!(
            policies.contains("s3:GetObject") && policies.contains("RecordingBucketName"),
            "{id}: {policies}"
        );
        assert!(
            policies.contains("kms:Decrypt") && policies.contains("RecordingBucketKmsKeyArn"),
            "{id}: {policies}"
        );
    }
}
