//! Ingest: what a recorded image and its job carry.

use std::collections::BTreeMap;

use sightline_core::model::{AnalysisJob, Detail};
use sightline_core::PriceTable;
use sightline_pipeline::Settings;

use crate::reconcile::{messages, pending, png, world_with, T0};

#[tokio::test]
async fn an_uploads_detail_wins_over_its_tenants_and_is_priced_and_carried_by_its_job() {
    let w = world_with(Settings {
        model: "gpt-4o".into(),
        detail: Detail::Auto,
        tenant_detail: BTreeMap::from([("t".to_string(), Detail::High)]),
        ..Settings::default()
    });
    // One upload asked for low detail; the other asked nothing (its tenant's high applies).
    let mut asked_low = pending("low", T0);
    asked_low.detail = Some(Detail::Low);
    for (rec, shade) in [(asked_low, 10), (pending("tenant", T0), 20)] {
        w.repo.put_image(&rec, None).await.unwrap();
        let key = rec.original_key.clone().unwrap();
        w.blobs.put(&key, png(shade), "image/png").await.unwrap();
        w.ingest.ingest_key(&key).await.unwrap();
    }
    let jobs: Vec<AnalysisJob> = messages(&w.queue)
        .await
        .iter()
        .map(|b| AnalysisJob::parse(b).unwrap())
        .collect();
    assert_eq!(jobs.len(), 2);
    let gpt4o = PriceTable::builtin().model("gpt-4o").unwrap();
    for (id, detail) in [("low", Detail::Low), ("tenant", Detail::High)] {
        let rec = w.repo.get_image("t", id).await.unwrap().unwrap();
        assert_eq!(rec.detail, Some(detail), "{id}");
        let resized = rec.resized.unwrap();
        let est = rec.estimate.unwrap();
        assert_eq!(
            est.image_tokens,
            gpt4o.image_tokens(resized.width, resized.height, detail),
            "{id}"
        );
        let job = jobs.iter().find(|j| j.image_id == id).unwrap();
        assert_eq!(job.detail, Some(detail), "{id}");
    }
    assert_eq!(
        w.repo
            .get_image("t", "low")
            .await
            .unwrap()
            .unwrap()
            .estimate
            .unwrap()
            .image_tokens,
        85
    );
}

#[tokio::test]
async fn the_lane_is_the_uploads_own_else_the_key_prefix_rule_else_the_default_and_the_job_carries_it(
) {
    use sightline_core::model::Lane;
    let w = world_with(Settings {
        batch_key_prefixes: vec!["uploads/t/nightly-".into()],
        ..Settings::default()
    });
    // An S3 drop under the prefix rule, one that asked for real time under it anyway, and one
    // outside it.
    let mut asked_realtime = pending("nightly-asked", T0);
    asked_realtime.lane = Some(Lane::Realtime);
    let cases = [
        (pending("nightly-drop", T0), Lane::Batch),
        (asked_realtime, Lane::Realtime),
        (pending("daytime", T0), Lane::Realtime),
    ];
    for (i, (rec, _)) in cases.iter().enumerate() {
        w.repo.put_image(rec, None).await.unwrap();
        let key = rec.original_key.clone().unwrap();
        w.blobs
            .put(&key, png(30 + i as u8), "image/png")
            .await
            .unwrap();
        w.ingest.ingest_key(&key).await.unwrap();
    }
    let jobs: Vec<AnalysisJob> = messages(&w.queue)
        .await
        .iter()
        .map(|b| AnalysisJob::parse(b).unwrap())
        .collect();
    for (rec, lane) in &cases {
        let id = &rec.image_id;
        let stored = w.repo.get_image("t", id).await.unwrap().unwrap();
        assert_eq!(stored.lane, Some(*lane), "{id}");
        let job = jobs.iter().find(|j| &j.image_id == id).unwrap();
        // Real-time jobs stay as they were before lanes existed (no field).
        let carried = job.lane.unwrap_or(Lane::Realtime);
        assert_eq!(carried, *lane, "{id}");
    }
    assert_eq!(
        Settings::default().lane_for(None, "uploads/t/nightly-x.png"),
        Lane::Realtime,
        "no rule, no batch"
    );
}
