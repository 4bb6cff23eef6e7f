//! The adapter contract against the AWS adapters (DynamoDB, SQS, S3, S3 Vectors) on the
//! emulator.

use std::sync::Arc;
use std::time::Duration;

use sightline_pipeline::aws::{
    aws_sdk_s3vectors, Clients, DynamoRepository, S3BlobStore, S3VectorStore, SqsQueue,
};
use sightline_pipeline::ports::{
    StoreError, VectorIndex, VectorMeta, VectorQuery, VectorRecord, VectorStore,
};
use sightline_tests::{aws_setup, contract, emulator::Emulator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_adapter_contract() {
    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));

    let table = contract::unique("contract-table-");
    aws_setup::create_table(&clients.dynamodb, &table)
        .await
        .unwrap();
    let repo = Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &table));

    let bucket = contract::unique("contract-bucket-");
    aws_setup::create_bucket(&clients.s3, &bucket)
        .await
        .unwrap();
    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &bucket));

    let (url, _dlq) = aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &contract::unique("contract-q-"),
        Duration::from_secs(30),
        100,
    )
    .await
    .unwrap();
    let queue =
        Arc::new(SqsQueue::new(clients.sqs.clone(), url).with_wait(Duration::from_millis(500)));

    // The vector bucket comes from the template in AWS; the store creates its indexes.
    let s3vectors = aws_sdk_s3vectors::Client::new(&sdk);
    let vector_bucket = contract::unique("contract-vectors-");
    aws_setup::create_vector_bucket(&s3vectors, &vector_bucket)
        .await
        .unwrap();
    let vectors = Arc::new(S3VectorStore::new(s3vectors, &vector_bucket));

    // A second client on the same table: another Lambda instance.
    let other_instance = Arc::new(DynamoRepository::new(
        Clients::new(&sdk, Some(&emu.endpoint)).dynamodb,
        &table,
    ));
    // Side by side on one table, as the Lambdas share it. (Run so on moto without its
    // DynamoDB requests serialized, a cancelled transaction's rollback undid other contracts'
    // writes: tests/emulator/dynamodb_serial.py.)
    tokio::join!(
        contract::repository_contract(repo.clone()),
        contract::batch_store_contract(repo.clone(), repo.clone()),
        contract::queue_contract(queue),
        contract::blob_contract(blobs),
        contract::vector_store_contract(vectors),
        contract::generation_store_contract(repo.clone()),
        contract::rate_limit_contract(repo, other_instance),
    );
}

/// Webhook secrets as SecureStrings under an SSM path; the settings' secret as the fallback.
/// A parameter that holds no `whsec_` secret is an error naming it, not a silent fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssm_webhook_secrets_contract() {
    use sightline_pipeline::aws::aws_sdk_ssm;
    use sightline_pipeline::aws::secrets::SsmWebhookSecrets;
    use sightline_pipeline::ports::WebhookSecrets;
    use sightline_pipeline::Settings;

    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let path = format!("/{}/webhook-secrets/", contract::unique("contract"));
    let put = |tenant: &str, value: &str| {
        ssm.put_parameter()
            .name(format!("{path}{tenant}"))
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .send()
    };
    put("acme", contract::OWN_WEBHOOK_SECRET).await.unwrap();
    let with_default = SsmWebhookSecrets::new(
        ssm.clone(),
        &path,
        Arc::new(Settings {
            webhook_secret: Some(contract::DEFAULT_WEBHOOK_SECRET.into()),
            ..Settings::default()
        }),
    );
    let without_default = SsmWebhookSecrets::new(ssm.clone(), &path, Arc::new(Settings::default()));
    contract::webhook_secrets_contract(Arc::new(with_default), Arc::new(without_default)).await;

    put("initech", "not a secret").await.unwrap();
    let fresh = SsmWebhookSecrets::new(ssm.clone(), &path, Arc::new(Settings::default()));
    let err = fresh.secret_for("initech").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Permanent(m) if m.contains(&format!("{path}initech"))),
        "{err}"
    );
}

/// What the contract does not reach but S3 Vectors imposes, on an emulator that refuses what
/// AWS refuses: more than 500 vectors in one PutVectors call, filterable metadata over 2 KB,
/// an index deleted under the store, keys that could mix tenants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_vector_store_limits() {
    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let s3vectors = aws_sdk_s3vectors::Client::new(&sdk);
    let bucket = contract::unique("limits-vectors-");
    aws_setup::create_vector_bucket(&s3vectors, &bucket)
        .await
        .unwrap();
    let store = S3VectorStore::new(s3vectors.clone(), &bucket);
    let dims = 16;
    let index = VectorIndex::new("limits-model", dims as u32);
    store.ensure_index(&index).await.unwrap();
    let tenant = contract::unique("tenant-");
    let record = |id: String, axis: usize, tags: Vec<String>| VectorRecord {
        tenant: tenant.clone(),
        image_id: id,
        vector: contract::unit_vector(dims, axis, 0.1),
        meta: VectorMeta {
            status: "done".into(),
            tags,
        },
    };

    // 1,200 records in one call: the store splits them into calls of at most 500.
    let many: Vec<VectorRecord> = (0..1200)
        .map(|i| record(format!("img-{i:04}"), i % dims, vec![]))
        .collect();
    store.put_vectors(&index, &many).await.unwrap();
    for id in ["img-0000", "img-0500", "img-1199"] {
        assert!(store
            .get_vector(&index, &tenant, id)
            .await
            .unwrap()
            .is_some());
    }

    // Tags that would take the metadata past 2 KB are cut; the vector is still stored.
    let tags: Vec<String> = (0..400).map(|i| format!("tag-{i:03}")).collect();
    store
        .put_vectors(&index, &[record("tagged".into(), 0, tags.clone())])
        .await
        .unwrap();
    let got = store
        .get_vector(&index, &tenant, "tagged")
        .await
        .unwrap()
        .unwrap();
    assert!(!got.meta.tags.is_empty() && got.meta.tags.len() < tags.len());
    assert_eq!(got.meta.tags[..], tags[..got.meta.tags.len()]);
    let hits = store
        .query(
            &index,
            &VectorQuery {
                tenant: tenant.clone(),
                vector: contract::unit_vector(dims, 0, 0.1),
                top_k: 5,
                tag: Some("tag-000".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].image_id, "tagged");

    // An index deleted behind the store's back (it remembers the indexes it ensured): the write
    // fails as transient, and the retry's ensure_index creates the index again.
    s3vectors
        .delete_index()
        .vector_bucket_name(&bucket)
        .index_name(index.name())
        .send()
        .await
        .unwrap();
    let one = [record("again".into(), 1, vec![])];
    match store.put_vectors(&index, &one).await {
        Err(StoreError::Transient(_)) => {}
        other => panic!("expected Transient, got {other:?}"),
    }
    store.ensure_index(&index).await.unwrap();
    store.put_vectors(&index, &one).await.unwrap();
    assert!(store
        .get_vector(&index, &tenant, "again")
        .await
        .unwrap()
        .is_some());

    // A tenant with '/' could share keys with another tenant: refused before any call.
    let mut bad = record("x".into(), 0, vec![]);
    bad.tenant = format!("{tenant}/img-0000");
    match store.put_vectors(&index, &[bad]).await {
        Err(StoreError::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}
