//! Smoke test of the AWS emulator harness (`sightline_tests::emulator`):
//! S3, SQS, DynamoDB basics and S3 -> SQS ObjectCreated notifications.
//!
//! Needs Docker and the emulator image:
//!   scripts/docker-up.sh && scripts/build-emulator-image.sh
//!   cargo test -p sightline-tests --test emulator_smoke
//! Never skipped: a missing Docker/image is a test failure with a hint.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CreateBucketConfiguration, Event, NotificationConfiguration,
    QueueConfiguration,
};
use aws_sdk_sqs::types::QueueAttributeName;
use sightline_tests::emulator::{Emulator, REGION};

fn s3_client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str) -> anyhow::Result<()> {
    let mut req = s3.create_bucket().bucket(bucket);
    // us-east-1 must not send a LocationConstraint; any other region must.
    if REGION != "us-east-1" {
        req = req.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(REGION))
                .build(),
        );
    }
    req.send().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_smoke() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let emu = Emulator::start().await?;
    eprintln!(
        "emulator {:?} at {} ready in {:?}",
        emu.flavor,
        emu.endpoint,
        t0.elapsed()
    );
    assert!(
        emu.endpoint.starts_with("http://127.0.0.1:"),
        "{}",
        emu.endpoint
    );
    let sdk = emu.sdk_config().await;

    // ---------------------------------------------------------------- S3
    let s3 = s3_client(&sdk);
    create_bucket(&s3, "smoke-bucket").await?;
    s3.put_object()
        .bucket("smoke-bucket")
        .key("dir/hello.txt")
        .content_type("text/plain")
        .body(ByteStream::from_static(b"hello emulator"))
        .send()
        .await?;
    let got = s3
        .get_object()
        .bucket("smoke-bucket")
        .key("dir/hello.txt")
        .send()
        .await?;
    assert_eq!(got.content_type(), Some("text/plain"));
    let body = got.body.collect().await?.into_bytes();
    assert_eq!(&body[..], b"hello emulator");

    // --------------------------------------------------------------- SQS
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let queue_url = sqs
        .create_queue()
        .queue_name("smoke-queue")
        .send()
        .await?
        .queue_url
        .expect("queue url");
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body("ping")
        .send()
        .await?;
    let received = sqs
        .receive_message()
        .queue_url(&queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await?;
    let msgs = received.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].body(), Some("ping"));
    sqs.delete_message()
        .queue_url(&queue_url)
        .receipt_handle(msgs[0].receipt_handle().expect("receipt handle"))
        .send()
        .await?;

    // ---------------------------------------------------------- DynamoDB
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    ddb.create_table()
        .table_name("smoke-table")
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()?,
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await?;
    let put = || {
        ddb.put_item()
            .table_name("smoke-table")
            .item("pk", AttributeValue::S("image#1".into()))
            .item("status", AttributeValue::S("pending".into()))
            .condition_expression("attribute_not_exists(pk)")
    };
    put().send().await?;
    let second = put().send().await;
    let err = second.expect_err("second conditional put must fail");
    let service_err = err.into_service_error();
    assert!(
        service_err.is_conditional_check_failed_exception(),
        "expected ConditionalCheckFailedException, got {service_err:?}"
    );

    // ------------------------------------- S3 -> SQS ObjectCreated events
    let notif_queue = sqs
        .create_queue()
        .queue_name("smoke-notifications")
        .send()
        .await?
        .queue_url
        .expect("queue url");
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&notif_queue)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("QueueArn");
    create_bucket(&s3, "smoke-uploads").await?;
    s3.put_bucket_notification_configuration()
        .bucket("smoke-uploads")
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(
                    QueueConfiguration::builder()
                        .queue_arn(&queue_arn)
                        .events(Event::S3ObjectCreated)
                        .build()?,
                )
                .build(),
        )
        .send()
        .await?;

    let keys = [
        "uploads/plain.jpg",
        "uploads/with space.jpg",
        "uploads/a+b.jpg",
        "uploads/ünïcødé ✓.jpg",
        "uploads/50%/x&y=z.jpg",
    ];
    for key in keys {
        s3.put_object()
            .bucket("smoke-uploads")
            .key(key)
            .body(ByteStream::from_static(b"\xff\xd8\xff"))
            .send()
            .await?;
    }

    // Collect event records (raw, as they appear in the message) by raw key.
    let mut saw_test_event = false;
    let mut records: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while records.len() < keys.len() && Instant::now() < deadline {
        let out = sqs
            .receive_message()
            .queue_url(&notif_queue)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await?;
        for m in out.messages() {
            let body: serde_json::Value = serde_json::from_str(m.body().unwrap_or_default())?;
            if body.get("Event").and_then(|e| e.as_str()) == Some("s3:TestEvent") {
                saw_test_event = true;
            }
            for r in body["Records"].as_array().into_iter().flatten() {
                let raw = r["s3"]["object"]["key"].as_str().unwrap_or_default();
                records.insert(raw.to_string(), r.clone());
            }
            sqs.delete_message()
                .queue_url(&notif_queue)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await?;
        }
    }
    eprintln!("s3:TestEvent seen first: {saw_test_event}");
    for (raw, r) in &records {
        eprintln!(
            "event {} key(raw)={raw:?} -> decoded={:?}",
            r["eventName"].as_str().unwrap_or_default(),
            decode_s3_event_key(raw)
        );
    }
    assert_eq!(records.len(), keys.len(), "got {:?}", records.keys());
    for r in records.values() {
        assert!(
            r["eventName"]
                .as_str()
                .is_some_and(|n| n.starts_with("ObjectCreated:")),
            "{r}"
        );
        assert_eq!(r["s3"]["bucket"]["name"], "smoke-uploads");
    }
    // AWS URL-encodes event keys like an HTML form (space -> '+', '+' -> %2B,
    // non-ASCII -> %XX of the UTF-8 bytes); decoding must give the real key.
    // moto 5.2 also encodes '/' as %2F (AWS leaves '/' as is), so never compare
    // raw event keys: always decode first.
    let decoded: Vec<String> = records.keys().map(|k| decode_s3_event_key(k)).collect();
    for key in keys {
        assert!(
            decoded.iter().any(|d| d == key),
            "key {key:?} not recoverable from event keys {:?}",
            records.keys()
        );
    }
    Ok(())
}

/// Decode an S3 event notification key: `application/x-www-form-urlencoded`
/// style ('+' is a space, `%XX` are UTF-8 bytes).
fn decode_s3_event_key(raw: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
