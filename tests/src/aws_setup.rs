//! Create the AWS resources of docs/aws.md on the emulator: the single table (with its GSIs,
//! TTL and point-in-time recovery), the bucket, queues with a DLQ, the S3 → SQS notification,
//! the S3 vector bucket (its indexes are created by the vector store).

use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
    PointInTimeRecoverySpecification, Projection, ProjectionType, ScalarAttributeType,
    TimeToLiveSpecification,
};
use aws_sdk_s3::types::{
    Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter,
    QueueConfiguration, S3KeyFilter,
};
use aws_sdk_sqs::types::QueueAttributeName;

fn key(name: &str, kt: KeyType) -> Result<KeySchemaElement> {
    Ok(KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kt)
        .build()?)
}

fn attr(name: &str) -> Result<AttributeDefinition> {
    Ok(AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()?)
}

fn gsi(name: &str, pk: &str, sk: &str) -> Result<GlobalSecondaryIndex> {
    Ok(GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key(pk, KeyType::Hash)?)
        .key_schema(key(sk, KeyType::Range)?)
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::All)
                .build(),
        )
        .build()?)
}

/// The sightline table: `pk`/`sk`, GSIs `gsi1`, `gsi2` and the sparse recheck index `gsi3`
/// (ALL), TTL on `expires_at`,
/// on-demand billing, point-in-time recovery.
pub async fn create_table(client: &aws_sdk_dynamodb::Client, name: &str) -> Result<()> {
    let mut req = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .global_secondary_indexes(gsi("gsi1", "gsi1pk", "gsi1sk")?)
        .global_secondary_indexes(gsi("gsi2", "gsi2pk", "gsi2sk")?)
        .global_secondary_indexes(gsi("gsi3", "gsi3pk", "gsi3sk")?);
    for a in [
        "pk", "sk", "gsi1pk", "gsi1sk", "gsi2pk", "gsi2sk", "gsi3pk", "gsi3sk",
    ] {
        req = req.attribute_definitions(attr(a)?);
    }
    req.send().await.context("CreateTable")?;
    client
        .update_time_to_live()
        .table_name(name)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name("expires_at")
                .build()?,
        )
        .send()
        .await
        .context("UpdateTimeToLive")?;
    client
        .update_continuous_backups()
        .table_name(name)
        .point_in_time_recovery_specification(
            PointInTimeRecoverySpecification::builder()
                .point_in_time_recovery_enabled(true)
                .build()?,
        )
        .send()
        .await
        .context("UpdateContinuousBackups")?;
    Ok(())
}

pub async fn create_bucket(s3: &aws_sdk_s3::Client, name: &str) -> Result<()> {
    s3.create_bucket()
        .bucket(name)
        .send()
        .await
        .context("CreateBucket")?;
    Ok(())
}

/// An S3 vector bucket (SSE-S3, as the template's); the store creates its indexes.
pub async fn create_vector_bucket(
    s3vectors: &sightline_pipeline::aws::aws_sdk_s3vectors::Client,
    name: &str,
) -> Result<()> {
    s3vectors
        .create_vector_bucket()
        .vector_bucket_name(name)
        .send()
        .await
        .context("CreateVectorBucket")?;
    Ok(())
}

/// A standard queue; returns its URL.
pub async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    visibility: Duration,
) -> Result<String> {
    let out = sqs
        .create_queue()
        .queue_name(name)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility.as_secs().to_string(),
        )
        .send()
        .await
        .context("CreateQueue")?;
    out.queue_url()
        .map(str::to_string)
        .context("CreateQueue returned no URL")
}

/// The queue's ARN, read back from the emulator.
pub async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<String> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .context("GetQueueAttributes")?;
    out.attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .context("no QueueArn")
}

/// A work queue with a DLQ after `max_receive` receives; returns (queue URL, DLQ URL).
pub async fn create_queue_with_dlq(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    visibility: Duration,
    max_receive: u32,
) -> Result<(String, String)> {
    let dlq = create_queue(sqs, &format!("{name}-dlq"), visibility).await?;
    let dlq_arn = queue_arn(sqs, &dlq).await?;
    let url = create_queue(sqs, name, visibility).await?;
    let policy =
        serde_json::json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive });
    sqs.set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
        .send()
        .await
        .context("SetQueueAttributes RedrivePolicy")?;
    Ok((url, dlq))
}

/// S3 `ObjectCreated:*` under `prefix` → the queue.
pub async fn notify_queue_on_prefix(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    queue_arn: &str,
    prefix: &str,
) -> Result<()> {
    notify_queue_on(s3, bucket, queue_arn, &[(prefix, None)]).await
}

/// S3 `ObjectCreated:*` of keys under each prefix (and with its suffix, if any) → the queue
/// (the bucket's whole notification configuration).
pub async fn notify_queue_on(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    queue_arn: &str,
    filters: &[(&str, Option<&str>)],
) -> Result<()> {
    let mut config = NotificationConfiguration::builder();
    for (prefix, suffix) in filters {
        let mut key = S3KeyFilter::builder().filter_rules(
            FilterRule::builder()
                .name(FilterRuleName::Prefix)
                .value(*prefix)
                .build(),
        );
        if let Some(suffix) = suffix {
            key = key.filter_rules(
                FilterRule::builder()
                    .name(FilterRuleName::Suffix)
                    .value(*suffix)
                    .build(),
            );
        }
        let filter = NotificationConfigurationFilter::builder()
            .key(key.build())
            .build();
        config = config.queue_configurations(
            QueueConfiguration::builder()
                .queue_arn(queue_arn)
                .events(Event::from("s3:ObjectCreated:*"))
                .filter(filter)
                .build()?,
        );
    }
    s3.put_bucket_notification_configuration()
        .bucket(bucket)
        .notification_configuration(config.build())
        .send()
        .await
        .context("PutBucketNotificationConfiguration")?;
    Ok(())
}

/// Messages currently in a queue (visible + in flight), from its attributes.
pub async fn queue_depth(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<u64> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .context("GetQueueAttributes")?;
    let attrs = out.attributes().context("no attributes")?;
    let get = |k: QueueAttributeName| {
        attrs
            .get(&k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(get(QueueAttributeName::ApproximateNumberOfMessages)
        + get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible))
}
