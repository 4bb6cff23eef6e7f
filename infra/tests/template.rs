//! Safety settings of the SAM template (infra/template.yaml), read as plain YAML.
//!
//! cfn-lint (scripts/infra-check.sh) checks that the template is valid CloudFormation; these tests
//! check the decisions that keep the pipeline safe and cheap: queue timing and redrive, partial
//! batch responses, the S3 trigger prefix, least-privilege IAM, encryption, the table design of
//! docs/aws.md, the S3 Vectors bucket and index, and that the provider key never sits in an
//! environment variable.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{as_list, branches, references, render, template};
use serde_json::Value;

const DATA_PLANE: &[&str] = &[
    "s3:",
    "sqs:",
    "dynamodb:",
    "ssm:",
    "kms:",
    "secretsmanager:",
    "s3vectors:",
];

struct Template {
    t: Value,
}

impl Template {
    fn load() -> Template {
        Template { t: template() }
    }

    fn resources(&self) -> &serde_json::Map<String, Value> {
        self.t["Resources"].as_object().expect("Resources")
    }

    fn resource(&self, id: &str) -> &Value {
        self.resources()
            .get(id)
            .unwrap_or_else(|| panic!("no resource {id}"))
    }

    fn of_type(&self, ty: &str) -> Vec<(&str, &Value)> {
        self.resources()
            .iter()
            .filter(|(_, r)| r["Type"] == ty)
            .map(|(k, r)| (k.as_str(), r))
            .collect()
    }

    fn parameter(&self, name: &str) -> &Value {
        self.t["Parameters"]
            .get(name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
    }

    /// The Serverless::Function whose cargo-lambda binary is `binary`.
    fn function(&self, binary: &str) -> (&str, &Value) {
        let found: Vec<_> = self
            .of_type("AWS::Serverless::Function")
            .into_iter()
            .filter(|(_, f)| f["Metadata"]["BuildProperties"]["Binary"] == binary)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one function builds binary {binary}"
        );
        found[0]
    }

    /// A function property, falling back to Globals.Function.
    fn function_prop<'a>(&'a self, f: &'a Value, key: &str) -> &'a Value {
        let own = &f["Properties"][key];
        if own.is_null() {
            &self.t["Globals"]["Function"][key]
        } else {
            own
        }
    }

    /// Environment variables of a function: Globals merged with its own (SAM semantics).
    fn env(&self, f: &Value) -> BTreeMap<String, Value> {
        let mut vars = BTreeMap::new();
        for src in [
            &self.t["Globals"]["Function"]["Environment"]["Variables"],
            &f["Properties"]["Environment"]["Variables"],
        ] {
            if let Some(m) = src.as_object() {
                for (k, v) in m {
                    vars.insert(k.clone(), v.clone());
                }
            }
        }
        vars
    }

    /// Resolve a number: a literal, a numeric string, or a Ref to a parameter (its Default).
    fn number(&self, v: &Value) -> f64 {
        match v {
            Value::Number(n) => n.as_f64().expect("number"),
            Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
            Value::Object(o) if o.contains_key("Ref") => {
                let p = self.parameter(o["Ref"].as_str().expect("Ref name"));
                self.number(&p["Default"])
            }
            other => panic!("cannot resolve a number from {other}"),
        }
    }

    /// The logical id a `Fn::GetAtt [X, Arn]` or `Ref X` points at.
    fn target(v: &Value) -> String {
        if let Some(r) = v.get("Ref").and_then(Value::as_str) {
            return r.to_string();
        }
        match &v["Fn::GetAtt"] {
            Value::Array(p) => p[0].as_str().expect("GetAtt id").to_string(),
            Value::String(s) => s.split('.').next().expect("GetAtt id").to_string(),
            other => panic!("not a Ref/GetAtt: {other} in {v}"),
        }
    }

    /// Events of a function of one SAM event type.
    fn events<'a>(&self, f: &'a Value, ty: &str) -> Vec<(&'a str, &'a Value)> {
        f["Properties"]["Events"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, e)| e["Type"] == ty)
                    .map(|(k, e)| (k.as_str(), &e["Properties"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every IAM policy statement of the template (roles, policies, function inline policies,
    /// bucket/queue policies), with Fn::If expanded into both branches.
    fn statements(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let mut add_doc = |owner: String, doc: &Value| {
            for s in as_list(&doc["Statement"]).iter().flat_map(branches) {
                out.push((owner.clone(), s));
            }
        };
        for (id, r) in self.resources() {
            let p = &r["Properties"];
            match r["Type"].as_str().unwrap_or("") {
                "AWS::IAM::Role" => {
                    for pol in as_list(&p["Policies"]).iter().flat_map(branches) {
                        add_doc(id.clone(), &pol["PolicyDocument"]);
                    }
                }
                "AWS::IAM::Policy"
                | "AWS::IAM::ManagedPolicy"
                | "AWS::S3::BucketPolicy"
                | "AWS::SQS::QueuePolicy" => add_doc(id.clone(), &p["PolicyDocument"]),
                "AWS::Serverless::Function" => {
                    for pol in as_list(&p["Policies"]).iter().flat_map(branches) {
                        if pol.get("Statement").is_some() {
                            add_doc(id.clone(), &pol);
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Allow statements of the role of a function: (actions, rendered resources, statement).
    fn role_grants(&self, f: &Value) -> Vec<(Vec<String>, Vec<String>, Value)> {
        let role_id = Template::target(&f["Properties"]["Role"]);
        let role = self.resource(&role_id);
        assert_eq!(role["Type"], "AWS::IAM::Role");
        let mut out = Vec::new();
        for pol in as_list(&role["Properties"]["Policies"])
            .iter()
            .flat_map(branches)
        {
            for s in as_list(&pol["PolicyDocument"]["Statement"])
                .iter()
                .flat_map(branches)
            {
                if s["Effect"] != "Allow" {
                    continue;
                }
                let actions = as_list(&s["Action"])
                    .iter()
                    .map(|a| a.as_str().expect("action string").to_string())
                    .collect();
                let resources = as_list(&s["Resource"]).iter().map(render).collect();
                out.push((actions, resources, s.clone()));
            }
        }
        out
    }

    /// Rendered resources on which the function's role allows `action`.
    fn resources_for(&self, f: &Value, action: &str) -> Vec<String> {
        self.role_grants(f)
            .into_iter()
            .filter(|(a, _, _)| a.iter().any(|x| x == action))
            .flat_map(|(_, r, _)| r)
            .collect()
    }
}

const RESIZE: &str = "sightline-resize";
const ANALYZE: &str = "sightline-analyze";
const API: &str = "sightline-api";
const RECONCILE: &str = "sightline-reconcile";
const BATCH: &str = "sightline-batch";
const GENERATE: &str = "sightline-generate";
/// Every function of the template.
const ALL: [&str; 6] = [RESIZE, ANALYZE, API, RECONCILE, BATCH, GENERATE];

#[test]
fn template_uses_long_form_intrinsics_only() {
    for (n, line) in sightline_infra_checks::TEMPLATE_YAML.lines().enumerate() {
        let code = line.split(" #").next().unwrap_or(line);
        assert!(
            !code.contains(": !") && !code.trim_start().starts_with("- !"),
            "line {}: short-form intrinsic tag (use Ref:/Fn::GetAtt:/Fn::Sub: mappings): {line}",
            n + 1
        );
    }
    let t = template();
    assert_eq!(t["Transform"], "AWS::Serverless-2016-10-31");
}

#[test]
fn functions_are_arm64_al2023_cargo_lambda_binaries() {
    let t = Template::load();
    let functions = t.of_type("AWS::Serverless::Function");
    assert_eq!(
        functions.len(),
        6,
        "six functions: resize, analyze, api, reconcile, batch, generate"
    );
    for (binary, dir) in [
        (RESIZE, "resize"),
        (ANALYZE, "analyze"),
        (API, "api"),
        (RECONCILE, "reconcile"),
        (BATCH, "batch"),
        (GENERATE, "generate"),
    ] {
        let (id, f) = t.function(binary);
        assert_eq!(f["Metadata"]["BuildMethod"], "rust-cargolambda", "{id}");
        assert_eq!(t.function_prop(f, "Runtime"), "provided.al2023", "{id}");
        assert_eq!(t.function_prop(f, "Handler"), "bootstrap", "{id}");
        assert_eq!(
            as_list(t.function_prop(f, "Architectures")),
            vec![Value::from("arm64")],
            "{id}"
        );
        let code_uri = format!("../functions/{dir}");
        assert_eq!(f["Properties"]["CodeUri"], code_uri.as_str(), "{id}");
        // Once the function crate exists, its package must be named like the binary.
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(&code_uri)
            .join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(&manifest) {
            assert!(
                text.lines().any(|l| {
                    let l = l.replace(' ', "");
                    l == format!("name=\"{binary}\"")
                }),
                "{} should name the package (and binary) {binary}",
                manifest.display()
            );
        }
        let log = t.function_prop(f, "LoggingConfig");
        let format = if log["LogFormat"].is_null() {
            &t.t["Globals"]["Function"]["LoggingConfig"]["LogFormat"]
        } else {
            &log["LogFormat"]
        };
        assert_eq!(format, "JSON", "{id}: JSON logs");
    }
    let (_, resize) = t.function(RESIZE);
    assert_eq!(
        t.number(t.function_prop(resize, "MemorySize")),
        1769.0,
        "resize: one full vCPU"
    );
    let (_, analyze) = t.function(ANALYZE);
    let mem = t.number(t.function_prop(analyze, "MemorySize"));
    assert!((256.0..=512.0).contains(&mem), "analyze memory {mem}");
    let (_, api) = t.function(API);
    assert_eq!(t.number(t.function_prop(api, "MemorySize")), 256.0);
    // The reconciler may resize a lost upload, within a budget of half its memory.
    let (id, reconcile) = t.function(RECONCILE);
    let mem = t.number(t.function_prop(reconcile, "MemorySize"));
    assert_eq!(mem, 1024.0, "{id} memory");
    let budget = t.number(&t.env(reconcile)["SIGHTLINE_RESIZE_MEMORY_MB"]);
    assert!(
        (64.0..=mem / 2.0).contains(&budget),
        "{id}: SIGHTLINE_RESIZE_MEMORY_MB {budget} for {mem} MB"
    );
}

/// Each function logs (JSON) to a log group of its own with the LogRetentionDays retention, and
/// its role may write to that log group only.
#[test]
fn each_function_logs_to_its_own_log_group() {
    let t = Template::load();
    let mut groups = BTreeSet::new();
    for binary in ALL {
        let (id, f) = t.function(binary);
        let group = Template::target(&f["Properties"]["LoggingConfig"]["LogGroup"]);
        let g = t.resource(&group);
        assert_eq!(g["Type"], "AWS::Logs::LogGroup", "{id}: {group}");
        assert_eq!(
            references(&g["Properties"]["RetentionInDays"]),
            vec!["LogRetentionDays"],
            "{group} retention"
        );
        assert!(groups.insert(group.clone()), "{group} is shared");
        for action in ["logs:CreateLogStream", "logs:PutLogEvents"] {
            assert_eq!(
                t.resources_for(f, action),
                vec![format!("${{{group}.Arn}}")],
                "{id}: {action}"
            );
        }
        assert!(t.resources_for(f, "logs:CreateLogGroup").is_empty());
    }
}

#[test]
fn analyze_queue_visibility_is_at_least_six_times_the_function_timeout() {
    let t = Template::load();
    let (id, f) = t.function(ANALYZE);
    let events = t.events(f, "SQS");
    assert_eq!(events.len(), 1, "{id} has one SQS event source");
    let queue_id = Template::target(&events[0].1["Queue"]);
    let queue = t.resource(&queue_id);
    assert_eq!(queue["Type"], "AWS::SQS::Queue");
    let timeout = t.number(t.function_prop(f, "Timeout"));
    let visibility = t.number(&queue["Properties"]["VisibilityTimeout"]);
    assert!(timeout > 0.0);
    assert!(
        visibility >= 6.0 * timeout,
        "{queue_id}.VisibilityTimeout {visibility} < 6 x {id}.Timeout {timeout}"
    );
}

#[test]
fn analyze_queue_redrives_to_a_dead_letter_queue_after_five_receives() {
    let t = Template::load();
    let (_, f) = t.function(ANALYZE);
    let queue_id = Template::target(&t.events(f, "SQS")[0].1["Queue"]);
    let redrive = &t.resource(&queue_id)["Properties"]["RedrivePolicy"];
    assert_eq!(t.number(&redrive["maxReceiveCount"]), 5.0);
    let dlq_id = Template::target(&redrive["deadLetterTargetArn"]);
    assert_ne!(dlq_id, queue_id);
    let dlq = t.resource(&dlq_id);
    assert_eq!(dlq["Type"], "AWS::SQS::Queue");
    assert!(
        dlq["Properties"]["RedrivePolicy"].is_null(),
        "the DLQ must not redrive further"
    );
    let dlq_retention = t.number(&dlq["Properties"]["MessageRetentionPeriod"]);
    assert!(
        dlq_retention >= 7.0 * 86_400.0,
        "keep dead letters long enough to look at them"
    );

    // An alarm fires on the first dead letter.
    let alarms = t.of_type("AWS::CloudWatch::Alarm");
    assert!(
        alarms.iter().any(|(_, a)| {
            let p = &a["Properties"];
            p["Namespace"] == "AWS/SQS"
                && p["MetricName"] == "ApproximateNumberOfMessagesVisible"
                && p["ComparisonOperator"] == "GreaterThanThreshold"
                && t.number(&p["Threshold"]) == 0.0
                && as_list(&p["Dimensions"])
                    .iter()
                    .any(|d| d["Name"] == "QueueName" && Template::target(&d["Value"]) == dlq_id)
        }),
        "an alarm on {dlq_id} ApproximateNumberOfMessagesVisible > 0"
    );
    assert!(t.t["Outputs"]["DeadLetterQueueUrl"].is_object());
}

#[test]
fn sqs_event_reports_batch_item_failures_and_caps_concurrency() {
    let t = Template::load();
    let (id, f) = t.function(ANALYZE);
    let (_, ev) = t.events(f, "SQS")[0];
    assert!(
        as_list(&ev["FunctionResponseTypes"]).contains(&Value::from("ReportBatchItemFailures")),
        "{id}: partial batch responses"
    );
    let max = &ev["ScalingConfig"]["MaximumConcurrency"];
    assert!(
        !max.is_null(),
        "{id}: ScalingConfig.MaximumConcurrency is set"
    );
    assert!(t.number(max) >= 2.0, "SQS MaximumConcurrency is at least 2");
    if let Some(p) = max.get("Ref").and_then(Value::as_str) {
        assert!(
            t.number(&t.parameter(p)["MinValue"]) >= 2.0,
            "{p} MinValue >= 2"
        );
    }
    // The per-instance rate limit divides by the same number.
    assert_eq!(&t.env(f)["SIGHTLINE_MAX_CONCURRENCY"], max);
    let batch = t.number(&ev["BatchSize"]);
    assert!((1.0..=10.0).contains(&batch), "default batch size {batch}");
    assert!(!ev["MaximumBatchingWindowInSeconds"].is_null());
}

#[test]
fn queues_are_encrypted() {
    let t = Template::load();
    for (id, q) in t.of_type("AWS::SQS::Queue") {
        let p = &q["Properties"];
        assert!(
            p["SqsManagedSseEnabled"] == true || !p["KmsMasterKeyId"].is_null(),
            "{id} is encrypted at rest"
        );
    }
}

#[test]
fn s3_trigger_is_the_uploads_prefix_and_the_output_prefix_differs() {
    let t = Template::load();
    let (id, f) = t.function(RESIZE);
    let events = t.events(f, "S3");
    assert_eq!(events.len(), 1, "{id} has one S3 event");
    let ev = events[0].1;
    assert_eq!(
        t.resource(&Template::target(&ev["Bucket"]))["Type"],
        "AWS::S3::Bucket"
    );
    let kinds: Vec<String> = as_list(&ev["Events"]).iter().map(render).collect();
    assert_eq!(kinds, vec!["s3:ObjectCreated:*"]);
    let rules = as_list(&ev["Filter"]["S3Key"]["Rules"]);
    let prefixes: Vec<&Value> = rules
        .iter()
        .filter(|r| r["Name"].as_str().map(str::to_lowercase).as_deref() == Some("prefix"))
        .map(|r| &r["Value"])
        .collect();
    assert_eq!(
        prefixes,
        vec!["uploads/"],
        "the trigger is the uploads/ prefix only"
    );

    let env = t.env(f);
    let upload = env["SIGHTLINE_UPLOAD_PREFIX"]
        .as_str()
        .expect("upload prefix");
    // The functions always write under the core's fixed output prefix.
    let resized = sightline_core::keys::RESIZED_PREFIX;
    assert_eq!(upload, "uploads/");
    assert!(!resized.is_empty() && resized.ends_with('/'));
    assert!(
        !resized.starts_with(upload) && !upload.starts_with(resized),
        "output prefix {resized} must not overlap the trigger prefix {upload}"
    );
    // Even a bug cannot recurse: resize may only write under the output prefix.
    let puts = t.resources_for(f, "s3:PutObject");
    assert!(!puts.is_empty());
    for r in &puts {
        assert!(
            r.ends_with(&format!("/{resized}*")),
            "resize s3:PutObject on {r}"
        );
    }
}

#[test]
fn s3_permissions_are_prefix_scoped() {
    let t = Template::load();
    let expect = |binary: &str, action: &str, suffix: &str| {
        let (id, f) = t.function(binary);
        let rs = t.resources_for(f, action);
        assert!(!rs.is_empty(), "{id} needs {action}");
        for r in rs {
            assert!(
                r.ends_with(suffix),
                "{id}: {action} on {r}, expected …{suffix}"
            );
        }
    };
    expect(RESIZE, "s3:GetObject", "/uploads/*");
    expect(RESIZE, "s3:PutObject", "/resized/*");
    expect(ANALYZE, "s3:GetObject", "/resized/*");
    expect(API, "s3:PutObject", "/uploads/*");
    // The reconciler reads lost uploads, and the resized images of manual reindex runs.
    let (_, reconcile) = t.function(RECONCILE);
    let reads = t.resources_for(reconcile, "s3:GetObject");
    assert_eq!(reads.len(), 2, "{reads:?}");
    assert!(reads.iter().any(|r| r.ends_with("/uploads/*")), "{reads:?}");
    assert!(
        reads.iter().any(|r| r == "${Bucket.Arn}/resized/*"),
        "{reads:?}"
    );
    expect(RECONCILE, "s3:PutObject", "/resized/*");
    let (_, analyze) = t.function(ANALYZE);
    assert!(t.resources_for(analyze, "s3:PutObject").is_empty());
    // The api signs thumbnail URLs of resized images, and reads the generation templates.
    let (_, api) = t.function(API);
    assert_eq!(
        t.resources_for(api, "s3:GetObject"),
        vec![
            "${Bucket.Arn}/resized/*",
            "${Bucket.Arn}/generations/templates.toml"
        ]
    );
    // The functions that read uploads (and the generate function, cached images that may have
    // expired) tell a missing one (404) from a forbidden one (403) only with s3:ListBucket,
    // granted on the bucket itself (no object), by the same name.
    let (_, bucket) = t.of_type("AWS::S3::Bucket")[0];
    let bucket_arn = format!(
        "arn:${{AWS::Partition}}:s3:::{}",
        render(&bucket["Properties"]["BucketName"])
    );
    for binary in [RESIZE, RECONCILE, GENERATE] {
        let (id, f) = t.function(binary);
        assert_eq!(
            t.resources_for(f, "s3:ListBucket"),
            vec![bucket_arn.clone()],
            "{id}: s3:ListBucket on the bucket only"
        );
    }
    for binary in [ANALYZE, API] {
        let (_, f) = t.function(binary);
        assert!(t.resources_for(f, "s3:ListBucket").is_empty(), "{binary}");
    }
    // Only the api deletes objects (DELETE /v1/images/{id}), and only images.
    for binary in ALL {
        let (id, f) = t.function(binary);
        let deletes = t.resources_for(f, "s3:DeleteObject");
        if binary == API {
            assert_eq!(
                deletes,
                vec!["${Bucket.Arn}/uploads/*", "${Bucket.Arn}/resized/*"],
                "{id}"
            );
        } else {
            assert!(deletes.is_empty(), "{id}");
        }
    }
}

#[test]
fn function_roles_are_least_privilege() {
    let t = Template::load();
    let table = |r: &str| r == "${Table.Arn}";
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    for binary in ALL {
        let (id, f) = t.function(binary);
        // An explicit role: SAM then adds no managed policies (e.g. AWSLambdaSQSQueueExecutionRole,
        // which allows sqs:* reads on "*").
        assert!(!f["Properties"]["Role"].is_null(), "{id} has its own role");
        assert!(
            f["Properties"]["Policies"].is_null(),
            "{id}: policies belong on its role"
        );
        let role = t.resource(&Template::target(&f["Properties"]["Role"]));
        assert!(
            role["Properties"]["ManagedPolicyArns"].is_null(),
            "{id}: no managed policies on the role"
        );
        let dynamo: BTreeSet<String> = t
            .role_grants(f)
            .into_iter()
            .flat_map(|(a, _, _)| a)
            .filter(|a| a.starts_with("dynamodb:"))
            .collect();
        let allowed = match binary {
            RESIZE => set(&[
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
            ]),
            ANALYZE => set(&[
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:DeleteItem",
                "dynamodb:ConditionCheckItem",
                "dynamodb:Query",
            ]),
            // The analyzer's exactly-once writes, and batch items and records (gsi1-3).
            BATCH => set(&[
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:DeleteItem",
                "dynamodb:ConditionCheckItem",
                "dynamodb:Query",
            ]),
            // Rechecks (Query gsi3), the resize path, and deleting unused pending records.
            RECONCILE => set(&[
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:DeleteItem",
                "dynamodb:Query",
            ]),
            // Generation jobs, rows, claims and deliveries, with the analyzer's ledger writes;
            // a dropped CSV's rows in batches of 25.
            GENERATE => set(&[
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:DeleteItem",
                "dynamodb:ConditionCheckItem",
                "dynamodb:Query",
                "dynamodb:BatchWriteItem",
            ]),
            // Reads, API keys and tenant budgets (set and removed by the admin routes), and a
            // generation job's rows in batches of 25.
            _ => set(&[
                "dynamodb:GetItem",
                "dynamodb:Query",
                "dynamodb:PutItem",
                "dynamodb:DeleteItem",
                "dynamodb:BatchWriteItem",
            ]),
        };
        assert!(
            dynamo.is_subset(&allowed),
            "{id}: {dynamo:?} not within {allowed:?}"
        );
        for (actions, resources, _) in t.role_grants(f) {
            if actions.iter().any(|a| a.starts_with("dynamodb:")) {
                for r in resources {
                    assert!(
                        table(&r) || r == "${Table.Arn}/index/*",
                        "{id}: dynamodb on {r}"
                    );
                }
            }
        }
    }
    let (_, api) = t.function(API);
    let q = t.resources_for(api, "dynamodb:Query");
    assert!(
        q.iter().any(|r| r == "${Table.Arn}/index/*"),
        "api queries the GSIs"
    );

    let (_, resize) = t.function(RESIZE);
    assert_eq!(
        t.resources_for(resize, "sqs:SendMessage")
            .iter()
            .filter(|r| *r == "${AnalyzeQueue.Arn}")
            .count(),
        1
    );
    let (_, analyze) = t.function(ANALYZE);
    for a in [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "sqs:ChangeMessageVisibility",
    ] {
        assert_eq!(
            t.resources_for(analyze, a),
            vec!["${AnalyzeQueue.Arn}"],
            "analyze {a}"
        );
    }
    // The api queues generation rows, nothing else.
    assert_eq!(
        t.resources_for(api, "sqs:SendMessage"),
        vec!["${GenerationQueue.Arn}"]
    );
    // A failed check generates a row again.
    assert_eq!(
        t.resources_for(analyze, "sqs:SendMessage"),
        vec!["${GenerationQueue.Arn}"]
    );

    // The reconciler finds due images through the gsi3 index and re-sends jobs; it consumes
    // nothing from the queue.
    let (_, reconcile) = t.function(RECONCILE);
    assert!(
        t.resources_for(reconcile, "dynamodb:Query")
            .iter()
            .any(|r| r == "${Table.Arn}/index/*"),
        "reconcile queries gsi3"
    );
    assert_eq!(
        t.resources_for(reconcile, "sqs:SendMessage"),
        vec!["${AnalyzeQueue.Arn}", "${GenerationQueue.Arn}"]
    );
    for a in [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
    ] {
        assert!(t.resources_for(reconcile, a).is_empty(), "reconcile {a}");
    }
}

#[test]
fn no_wildcard_resource_on_data_plane_actions() {
    let t = Template::load();
    let statements = t.statements();
    assert!(statements.len() > 5);
    for (owner, s) in statements {
        if s["Effect"] != "Allow" {
            continue;
        }
        assert!(
            s["NotResource"].is_null() && s["NotAction"].is_null(),
            "{owner}: {s}"
        );
        let actions: Vec<String> = as_list(&s["Action"]).iter().map(render).collect();
        for a in &actions {
            assert!(
                a != "*" && !a.ends_with(":*"),
                "{owner}: wildcard action {a}"
            );
        }
        if !actions
            .iter()
            .any(|a| DATA_PLANE.iter().any(|p| a.starts_with(p)))
        {
            continue;
        }
        for r in as_list(&s["Resource"]).iter().flat_map(branches) {
            let r = render(&r);
            assert!(
                r != "*" && !r.ends_with(":*:*") && r != "arn:aws:s3:::*",
                "{owner}: {actions:?} on Resource {r}"
            );
        }
    }
}

/// Each provider's key variable names its own parameter, and the analyze role may read exactly
/// those parameters.
/// The admin key's variable and parameter (the api function's only secret).
const ADMIN_KEY_PARAM: (&str, &str) = ("SIGHTLINE_ADMIN_KEY_PARAM", "AdminKeyParameter");

/// The SSM parameters of the tenants' webhook secrets: everything under the path parameter.
const WEBHOOK_SECRETS: &str =
    "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${WebhookSecretsPath}*";
/// The variable naming that path, and its parameter.
const WEBHOOK_SECRETS_PATH: (&str, &str) = ("SIGHTLINE_WEBHOOK_SECRETS_PATH", "WebhookSecretsPath");

const KEY_PARAMS: [(&str, &str); 2] = [
    ("SIGHTLINE_OPENAI_KEY_PARAM", "OpenAiKeyParameter"),
    ("SIGHTLINE_ANTHROPIC_KEY_PARAM", "AnthropicKeyParameter"),
];

#[test]
fn provider_keys_are_read_each_from_exactly_its_ssm_parameter() {
    let t = Template::load();
    for binary in [ANALYZE, BATCH] {
        provider_keys_of(&t, binary);
    }
    // Only the functions that call the provider read the keys; generate calls OpenAI's
    // Images API (or Bedrock, with its role), so it reads the OpenAI key only.
    for b in [RESIZE, API, RECONCILE] {
        let (_, other) = t.function(b);
        for (var, _) in KEY_PARAMS {
            assert!(!t.env(other).contains_key(var));
        }
    }
    let (id, generate) = t.function(GENERATE);
    let env = t.env(generate);
    assert_eq!(
        references(&env[KEY_PARAMS[0].0])
            .into_iter()
            .filter(|r| !r.starts_with("AWS::"))
            .collect::<Vec<_>>(),
        vec![KEY_PARAMS[0].1.to_string()],
        "{id}"
    );
    assert!(!env.contains_key(KEY_PARAMS[1].0), "{id}");
    assert_eq!(
        t.resources_for(generate, "ssm:GetParameter"),
        vec![format!(
            "arn:${{AWS::Partition}}:ssm:${{AWS::Region}}:${{AWS::AccountId}}:parameter${{{}}}",
            KEY_PARAMS[0].1
        )],
        "{id}"
    );
    let (_, resize) = t.function(RESIZE);
    assert!(t.resources_for(resize, "ssm:GetParameter").is_empty());
    assert!(t.resources_for(resize, "kms:Decrypt").is_empty());
    // The reconciler signs webhooks: it reads the webhook secrets and nothing else secret.
    let (_, reconcile) = t.function(RECONCILE);
    assert_eq!(
        t.resources_for(reconcile, "ssm:GetParameter"),
        vec![WEBHOOK_SECRETS.to_string()]
    );
}

#[test]
fn the_api_reads_exactly_the_admin_key_parameter_and_nothing_else_secret() {
    let t = Template::load();
    let (id, api) = t.function(API);
    let env = t.env(api);
    let from: Vec<String> = references(&env[ADMIN_KEY_PARAM.0])
        .into_iter()
        .filter(|r| !r.starts_with("AWS::"))
        .collect();
    assert_eq!(from, vec![ADMIN_KEY_PARAM.1.to_string()], "{id}");
    assert!(t.parameter(ADMIN_KEY_PARAM.1)["AllowedPattern"]
        .as_str()
        .is_some_and(|s| s.contains('/')));
    // And the webhook secrets, to refuse a job whose webhook could not be signed.
    assert_eq!(
        t.resources_for(api, "ssm:GetParameter"),
        vec![
            format!(
                "arn:${{AWS::Partition}}:ssm:${{AWS::Region}}:${{AWS::AccountId}}:parameter${{{}}}",
                ADMIN_KEY_PARAM.1
            ),
            WEBHOOK_SECRETS.to_string()
        ]
    );
    let decrypt: Vec<_> = t
        .role_grants(api)
        .into_iter()
        .filter(|(a, _, _)| a.iter().any(|x| x == "kms:Decrypt"))
        .collect();
    assert_eq!(decrypt.len(), 1);
    assert_eq!(
        render(&decrypt[0].2["Condition"]["StringEquals"]["kms:ViaService"]),
        "ssm.${AWS::Region}.amazonaws.com"
    );
}

fn provider_keys_of(t: &Template, binary: &str) {
    let (id, f) = t.function(binary);
    let env = t.env(f);
    for (var, parameter) in KEY_PARAMS {
        let param = &env[var];
        let from: Vec<String> = references(param)
            .into_iter()
            .filter(|r| !r.starts_with("AWS::"))
            .collect();
        assert_eq!(
            from,
            vec![parameter.to_string()],
            "{id}: {var} comes from the {parameter} parameter: {param}"
        );
        let p = t.parameter(parameter);
        assert!(
            p["AllowedPattern"]
                .as_str()
                .is_some_and(|s| s.contains('/')),
            "{parameter}: a parameter name"
        );
    }

    let gets = t.resources_for(f, "ssm:GetParameter");
    let want: Vec<String> = KEY_PARAMS
        .iter()
        .map(|(_, p)| {
            format!("arn:${{AWS::Partition}}:ssm:${{AWS::Region}}:${{AWS::AccountId}}:parameter${{{p}}}")
        })
        .collect();
    assert_eq!(gets, want);
    let decrypt: Vec<_> = t
        .role_grants(f)
        .into_iter()
        .filter(|(a, _, _)| a.iter().any(|x| x == "kms:Decrypt"))
        .collect();
    assert_eq!(decrypt.len(), 1, "one kms:Decrypt statement");
    let via = render(&decrypt[0].2["Condition"]["StringEquals"]["kms:ViaService"]);
    assert_eq!(
        via, "ssm.${AWS::Region}.amazonaws.com",
        "{id}: kms:Decrypt only via SSM"
    );
}

#[test]
fn no_secret_in_any_plain_environment_variable() {
    let t = Template::load();
    let mut all = vec![(
        "Globals".to_string(),
        t.t["Globals"]["Function"]["Environment"]["Variables"].clone(),
    )];
    for (id, r) in t.resources() {
        all.push((
            id.clone(),
            r["Properties"]["Environment"]["Variables"].clone(),
        ));
    }
    for (owner, vars) in all {
        let Some(vars) = vars.as_object() else {
            continue;
        };
        for (k, v) in vars {
            let upper = k.to_uppercase();
            // The webhook secrets' variable names where they are (an SSM path), checked below.
            let names_a_path = k == WEBHOOK_SECRETS_PATH.0
                && references(v) == vec![WEBHOOK_SECRETS_PATH.1.to_string()];
            let secretish = !names_a_path
                && (["API_KEY", "SECRET", "TOKEN", "PASSWORD"]
                    .iter()
                    .any(|w| upper.contains(w))
                    || upper.ends_with("_KEY"));
            assert!(
                !secretish,
                "{owner}: environment variable {k} looks like a secret"
            );
            for branch in branches(v) {
                let s = render(&branch);
                assert!(
                    !s.starts_with("sk-"),
                    "{owner}: {k} holds a key-like literal"
                );
                for name in references(&branch) {
                    if let Some(p) = t.t["Parameters"].get(&name) {
                        assert!(
                            p["NoEcho"].is_null(),
                            "{owner}: {k} passes the NoEcho (secret) parameter {name}"
                        );
                        let lname = name.to_lowercase();
                        assert!(
                            !(lname.contains("key") || lname.contains("secret"))
                                || KEY_PARAMS.iter().any(|(var, _)| k == var)
                                || k == ADMIN_KEY_PARAM.0
                                || k == WEBHOOK_SECRETS_PATH.0,
                            "{owner}: {k} from parameter {name}"
                        );
                    }
                }
            }
        }
    }
    // The webhook secrets' path is a path of parameter names.
    let path = t.parameter(WEBHOOK_SECRETS_PATH.1);
    assert!(path["AllowedPattern"]
        .as_str()
        .is_some_and(|re| re.starts_with("^(/") && re.ends_with("/$")));
    // The key is not a template parameter either.
    for (name, p) in t.t["Parameters"].as_object().expect("Parameters") {
        assert!(
            p["NoEcho"].is_null(),
            "{name}: pass secrets via SSM, not parameters"
        );
    }
}

#[test]
fn bucket_blocks_public_access_and_is_encrypted() {
    let t = Template::load();
    let buckets = t.of_type("AWS::S3::Bucket");
    assert_eq!(buckets.len(), 1);
    let (id, b) = buckets[0];
    let p = &b["Properties"];
    for k in [
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    ] {
        assert_eq!(p["PublicAccessBlockConfiguration"][k], true, "{id}.{k}");
    }
    let sse = as_list(&p["BucketEncryption"]["ServerSideEncryptionConfiguration"]);
    assert!(!sse.is_empty(), "{id} is encrypted");
    for rule in sse {
        let alg = &rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"];
        assert!(
            ["AES256", "aws:kms", "aws:kms:dsse"]
                .iter()
                .any(|a| alg == a),
            "{id}: SSEAlgorithm {alg}"
        );
    }
    // TLS only.
    let policies = t.of_type("AWS::S3::BucketPolicy");
    assert!(policies.iter().any(|(_, bp)| {
        as_list(&bp["Properties"]["PolicyDocument"]["Statement"])
            .iter()
            .any(|s| {
                s["Effect"] == "Deny" && s["Condition"]["Bool"]["aws:SecureTransport"] == "false"
            })
    }));
}

#[test]
fn bucket_cors_and_lifecycle() {
    let t = Template::load();
    let (_, b) = t.of_type("AWS::S3::Bucket")[0];
    let p = &b["Properties"];
    let rules = as_list(&p["CorsConfiguration"]["CorsRules"]);
    assert_eq!(rules.len(), 1);
    let r = &rules[0];
    assert_eq!(as_list(&r["AllowedMethods"]), vec![Value::from("PUT")]);
    assert_eq!(references(&r["AllowedOrigins"]), vec!["WidgetOrigin"]);
    let headers: Vec<String> = as_list(&r["AllowedHeaders"]).iter().map(render).collect();
    assert!(headers
        .iter()
        .any(|h| h.eq_ignore_ascii_case("content-type")));

    // uploads/ originals expire after UploadRetentionDays and the generation cache after
    // GenerationCacheRetentionDays, unless the parameter is 0 (a Condition).
    let lifecycle = as_list(&p["LifecycleConfiguration"]["Rules"]);
    for (prefix, days) in [
        (sightline_core::keys::UPLOAD_PREFIX, "UploadRetentionDays"),
        (
            sightline_pipeline::generation::GENERATION_CACHE_PREFIX,
            "GenerationCacheRetentionDays",
        ),
    ] {
        let conditional = lifecycle
            .iter()
            .filter_map(|x| x.get("Fn::If").and_then(Value::as_array))
            .find(|args| args[1]["Prefix"] == prefix || args[1]["Filter"]["Prefix"] == prefix)
            .unwrap_or_else(|| panic!("a conditional {prefix} expiration rule"));
        let cond = conditional[0].as_str().expect("condition name");
        let condition = &t.t["Conditions"][cond];
        assert!(condition.is_object(), "condition {cond} exists");
        assert_eq!(references(condition), vec![days], "{cond} tests {days}");
        assert_eq!(references(&conditional[1]["ExpirationInDays"]), vec![days]);
        assert!(common::is_no_value(&conditional[2]));
    }
    // The list is never empty whatever the parameters are.
    assert!(lifecycle.iter().any(|x| x.get("Fn::If").is_none()));
}

#[test]
fn table_follows_docs_aws_md() {
    let t = Template::load();
    let tables = t.of_type("AWS::DynamoDB::Table");
    assert_eq!(tables.len(), 1, "one table");
    let (id, table) = tables[0];
    let p = &table["Properties"];
    assert_eq!(p["BillingMode"], "PAY_PER_REQUEST", "{id}: on-demand");
    assert_eq!(
        p["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );
    assert_eq!(p["TimeToLiveSpecification"]["AttributeName"], "expires_at");
    assert_eq!(p["TimeToLiveSpecification"]["Enabled"], true);
    assert_eq!(p["SSESpecification"]["SSEEnabled"], true);
    let keys = |v: &Value| -> Vec<(String, String)> {
        as_list(v)
            .iter()
            .map(|k| (render(&k["AttributeName"]), render(&k["KeyType"])))
            .collect()
    };
    let pair = |h: &str, r: &str| {
        vec![
            (h.to_string(), "HASH".to_string()),
            (r.to_string(), "RANGE".to_string()),
        ]
    };
    assert_eq!(keys(&p["KeySchema"]), pair("pk", "sk"));
    let gsis = as_list(&p["GlobalSecondaryIndexes"]);
    assert_eq!(gsis.len(), 3);
    for (name, h, r) in [
        ("gsi1", "gsi1pk", "gsi1sk"),
        ("gsi2", "gsi2pk", "gsi2sk"),
        ("gsi3", "gsi3pk", "gsi3sk"),
    ] {
        let g = gsis
            .iter()
            .find(|g| g["IndexName"] == name)
            .unwrap_or_else(|| panic!("GSI {name}"));
        assert_eq!(keys(&g["KeySchema"]), pair(h, r), "{name}");
        assert_eq!(g["Projection"]["ProjectionType"], "ALL", "{name}");
    }
    let attrs: BTreeMap<String, String> = as_list(&p["AttributeDefinitions"])
        .iter()
        .map(|a| (render(&a["AttributeName"]), render(&a["AttributeType"])))
        .collect();
    for a in [
        "pk", "sk", "gsi1pk", "gsi1sk", "gsi2pk", "gsi2sk", "gsi3pk", "gsi3sk",
    ] {
        assert_eq!(attrs.get(a).map(String::as_str), Some("S"), "attribute {a}");
    }
    assert_eq!(attrs.len(), 8, "only key attributes are declared");
}

#[test]
fn functions_get_the_documented_environment() {
    let t = Template::load();
    for binary in ALL {
        let (id, f) = t.function(binary);
        let env = t.env(f);
        for k in [
            "SIGHTLINE_BUCKET",
            "SIGHTLINE_TABLE",
            "SIGHTLINE_UPLOAD_PREFIX",
            "SIGHTLINE_MODEL",
            "SIGHTLINE_PROMPT_VERSION",
            "SIGHTLINE_MAX_EDGE",
        ] {
            assert!(env.contains_key(k), "{id} lacks {k}");
        }
        assert_eq!(references(&env["SIGHTLINE_TABLE"]), vec!["Table"]);
    }
    for binary in [RESIZE, ANALYZE, RECONCILE, BATCH] {
        let (id, f) = t.function(binary);
        assert_eq!(
            references(&t.env(f)["SIGHTLINE_QUEUE_URL"]),
            vec!["AnalyzeQueue"],
            "{id}"
        );
    }
    let (_, analyze) = t.function(ANALYZE);
    let env = t.env(analyze);
    for (k, p) in [
        ("OPENAI_BASE_URL", "OpenAiBaseUrl"),
        ("SIGHTLINE_MODEL", "Model"),
        ("SIGHTLINE_FALLBACK_MODELS", "FallbackModels"),
        ("SIGHTLINE_RPM", "Rpm"),
        ("SIGHTLINE_TPM", "Tpm"),
        ("SIGHTLINE_PROMPT_VERSION", "PromptVersion"),
        ("SIGHTLINE_MAX_EDGE", "MaxEdge"),
        ("SIGHTLINE_MAX_CONCURRENCY", "MaxConcurrency"),
        ("SIGHTLINE_SHARED_LIMIT", "SharedLimit"),
    ] {
        assert_eq!(references(&env[k]), vec![p.to_string()], "{k}");
    }
    // The analyzer's last delivery is the redrive's: that is when it marks an image failed.
    let (_, queue) = t
        .of_type("AWS::SQS::Queue")
        .into_iter()
        .find(|(_, q)| !q["Properties"]["RedrivePolicy"].is_null())
        .expect("a queue with a redrive policy");
    assert_eq!(
        render(&env["SIGHTLINE_MAX_RECEIVES"]),
        render(&queue["Properties"]["RedrivePolicy"]["maxReceiveCount"]),
        "SIGHTLINE_MAX_RECEIVES = maxReceiveCount"
    );
    // The computed bucket name in the environment is the bucket's own name.
    let (_, b) = t.of_type("AWS::S3::Bucket")[0];
    assert_eq!(env["SIGHTLINE_BUCKET"], b["Properties"]["BucketName"]);
}

#[test]
fn http_api_routes_cors_and_throttling() {
    let t = Template::load();
    let (id, f) = t.function(API);
    let mut routes: Vec<(String, String)> = t
        .events(f, "HttpApi")
        .into_iter()
        .map(|(_, e)| (render(&e["Method"]).to_uppercase(), render(&e["Path"])))
        .collect();
    routes.sort();
    let mut expected: Vec<(String, String)> = sightline_infra_checks::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    expected.sort();
    assert_eq!(routes, expected, "{id} HttpApi events");
    for (_, e) in t.events(f, "HttpApi") {
        assert_eq!(
            t.resource(&Template::target(&e["ApiId"]))["Type"],
            "AWS::Serverless::HttpApi"
        );
    }

    let apis = t.of_type("AWS::Serverless::HttpApi");
    assert_eq!(apis.len(), 1);
    let p = &apis[0].1["Properties"];
    let cors = &p["CorsConfiguration"];
    assert_eq!(references(&cors["AllowOrigins"]), vec!["WidgetOrigin"]);
    let lower = |v: &Value| -> BTreeSet<String> {
        as_list(v)
            .iter()
            .map(|x| render(x).to_lowercase())
            .collect()
    };
    for h in ["content-type", "x-api-key", "authorization"] {
        assert!(lower(&cors["AllowHeaders"]).contains(h), "CORS header {h}");
    }
    for m in ["get", "post", "options"] {
        assert!(lower(&cors["AllowMethods"]).contains(m), "CORS method {m}");
    }
    let throttling = &p["DefaultRouteSettings"];
    assert!(t.number(&throttling["ThrottlingBurstLimit"]) > 0.0);
    assert!(t.number(&throttling["ThrottlingRateLimit"]) > 0.0);
}

#[test]
fn outputs_and_references_resolve() {
    let t = Template::load();
    for o in [
        "ApiUrl",
        "BucketName",
        "QueueUrl",
        "DeadLetterQueueUrl",
        "TableName",
        "DashboardUrl",
    ] {
        assert!(t.t["Outputs"][o]["Value"].is_object(), "output {o}");
    }
    let mut known: BTreeSet<String> = t.resources().keys().cloned().collect();
    known.extend(
        t.t["Parameters"]
            .as_object()
            .expect("params")
            .keys()
            .cloned(),
    );
    let conditions: BTreeSet<String> = t.t["Conditions"]
        .as_object()
        .map(|c| c.keys().cloned().collect())
        .unwrap_or_default();
    for section in ["Globals", "Resources", "Outputs", "Conditions"] {
        for name in references(&t.t[section]) {
            assert!(
                known.contains(&name) || name.starts_with("AWS::"),
                "{section}: reference to unknown {name}"
            );
        }
        let mut pairs = Vec::new();
        common::walk(&t.t[section], &mut pairs);
        for (k, v) in pairs {
            if k == "Fn::If" {
                let c = v[0].as_str().expect("condition name");
                assert!(conditions.contains(c), "unknown condition {c}");
            }
        }
    }
}

/// The bucket's notification configuration (added by SAM for the S3 event) points at the resize
/// function, so nothing the resize function depends on may refer to the bucket resource: that
/// would be a circular dependency that only shows at deploy time.
#[test]
fn no_circular_dependencies_through_the_bucket_notification() {
    let t = Template::load();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, r) in t.resources() {
        // SAM turns Events into separate resources (notification, mapping, permission) that
        // depend on the function, not the other way round.
        let mut props = r["Properties"].clone();
        if r["Type"] == "AWS::Serverless::Function" {
            if let Some(o) = props.as_object_mut() {
                o.remove("Events");
            }
        }
        let mut deps: BTreeSet<String> = references(&props)
            .into_iter()
            .filter(|n| t.resources().contains_key(n))
            .collect();
        for d in as_list(&r["DependsOn"]) {
            deps.insert(render(&d));
        }
        // SAM function properties come from Globals too.
        if r["Type"] == "AWS::Serverless::Function" {
            deps.extend(
                references(&t.t["Globals"]["Function"])
                    .into_iter()
                    .filter(|n| t.resources().contains_key(n)),
            );
        }
        graph.entry(id.clone()).or_default().extend(deps);
    }
    for (fid, f) in t.of_type("AWS::Serverless::Function") {
        for (_, ev) in t.events(f, "S3") {
            let bucket = Template::target(&ev["Bucket"]);
            graph.entry(bucket).or_default().insert(fid.to_string());
        }
    }
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => panic!("circular dependency: {} -> {m}", path.join(" -> ")),
                Some(_) => {}
                None => visit(m, g, state, path),
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n) {
            visit(n, &graph, &mut state, &mut Vec::new());
        }
    }
}

#[test]
fn example_parameters_cover_exactly_the_template_parameters() {
    let t = Template::load();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("parameters.example.json");
    let text = std::fs::read_to_string(&path).expect("infra/parameters.example.json");
    let example: Value = serde_json::from_str(&text).expect("valid JSON");
    let names = |v: &Value| -> BTreeSet<String> {
        v.as_object().expect("object").keys().cloned().collect()
    };
    assert_eq!(names(&example), names(&t.t["Parameters"]));
    for (k, v) in example.as_object().expect("object") {
        assert!(v.is_string(), "{k}: parameter overrides are strings");
        if let Some(re) = t.parameter(k)["AllowedValues"].as_array() {
            assert!(
                re.iter().any(|a| render(a) == render(v)),
                "{k}={v} not allowed"
            );
        }
    }
}

/// The reconciler runs on an EventBridge schedule (a parameter, every 5 minutes by default),
/// long enough to sweep in chunks past its 60 s reserve, and an alarm watches its failures.
#[test]
fn reconciler_runs_on_a_schedule() {
    let t = Template::load();
    let (id, f) = t.function(RECONCILE);
    let all_events = f["Properties"]["Events"].as_object().expect("Events");
    let schedules = t.events(f, "Schedule");
    assert_eq!(
        (schedules.len(), all_events.len()),
        (2, 2),
        "{id}: two triggers, the sweep's schedule and the deliveries' one"
    );
    let (_, ev) = schedules
        .iter()
        .find(|(_, e)| e["Input"].is_null())
        .expect("the sweep");
    assert_eq!(references(&ev["Schedule"]), vec!["ReconcileSchedule"]);
    // Webhook deliveries every minute (the first retry of a failed one is due after 5 s).
    let (_, deliveries) = schedules
        .iter()
        .find(|(_, e)| !e["Input"].is_null())
        .expect("the deliveries' schedule");
    assert_eq!(deliveries["Schedule"], "rate(1 minute)");
    let input: Value =
        serde_json::from_str(deliveries["Input"].as_str().expect("Input")).expect("JSON input");
    assert_eq!(
        input,
        serde_json::json!({ "task": sightline_reconcile::DELIVERIES_TASK })
    );
    assert!(
        ev["Enabled"] != false && ev["State"] != "DISABLED",
        "{id}: the schedule is enabled"
    );
    let p = t.parameter("ReconcileSchedule");
    assert_eq!(p["Default"], "rate(5 minutes)");
    assert!(p["AllowedPattern"]
        .as_str()
        .is_some_and(|re| re.contains("rate")));

    let timeout = t.number(t.function_prop(f, "Timeout"));
    assert!(
        (120.0..=900.0).contains(&timeout),
        "{id}: timeout {timeout} s leaves room for chunks after the 60 s reserve"
    );
    let max = t.number(&t.env(f)["SIGHTLINE_RECONCILE_MAX"]);
    assert!(max >= 1.0, "{id}: SIGHTLINE_RECONCILE_MAX {max}");
    // Async retries of a failed sweep stop before they pile up behind the next sweeps.
    let age = t.number(&f["Properties"]["EventInvokeConfig"]["MaximumEventAgeInSeconds"]);
    assert!((60.0..=3600.0).contains(&age), "{id}: event age {age}");

    let alarms = t.of_type("AWS::CloudWatch::Alarm");
    assert!(
        alarms.iter().any(|(_, a)| {
            let p = &a["Properties"];
            p["Namespace"] == "AWS/Lambda"
                && p["MetricName"] == "Errors"
                && as_list(&p["Dimensions"])
                    .iter()
                    .any(|d| d["Name"] == "FunctionName" && Template::target(&d["Value"]) == id)
                && references(&p["AlarmActions"]).contains(&"AlarmTopic".to_string())
        }),
        "an alarm on {id} Errors"
    );
}

/// The batch function ticks on an EventBridge schedule (a parameter, every minute by default),
/// with memory for one batch input, the lane settings it and the resize function need, and the
/// rights to build, submit and reconcile batches and send jobs back to the real-time lane.
#[test]
fn batch_function_ticks_on_a_schedule_with_its_settings_and_rights() {
    let t = Template::load();
    let (id, f) = t.function(BATCH);
    let all_events = f["Properties"]["Events"].as_object().expect("Events");
    let schedules = t.events(f, "Schedule");
    assert_eq!(
        (schedules.len(), all_events.len()),
        (1, 1),
        "{id}: one trigger, a Schedule event"
    );
    let ev = schedules[0].1;
    assert_eq!(references(&ev["Schedule"]), vec!["BatchSchedule"]);
    assert!(ev["Enabled"] != false && ev["State"] != "DISABLED");
    assert_eq!(t.parameter("BatchSchedule")["Default"], "rate(1 minute)");

    // One batch input (SIGHTLINE_BATCH_MAX_MB, 100 MB by default) fits several times over.
    let mem = t.number(t.function_prop(f, "MemorySize"));
    let max_mb = t.number(&t.parameter("BatchMaxMb")["Default"]);
    assert_eq!(max_mb, 100.0);
    assert!(
        mem >= 4.0 * max_mb,
        "{id}: {mem} MB for a {max_mb} MB input"
    );
    let timeout = t.number(t.function_prop(f, "Timeout"));
    assert!(
        (300.0..=900.0).contains(&timeout),
        "{id}: timeout {timeout}"
    );

    let env = t.env(f);
    for (k, p) in [
        ("SIGHTLINE_BATCH_MAX_WAIT_SECS", "BatchMaxWaitSecs"),
        ("SIGHTLINE_BATCH_MAX_REQUESTS", "BatchMaxRequests"),
        ("SIGHTLINE_BATCH_MAX_MB", "BatchMaxMb"),
        ("SIGHTLINE_BATCH_ATTEMPTS", "BatchAttempts"),
        ("SIGHTLINE_MODEL", "Model"),
        ("OPENAI_BASE_URL", "OpenAiBaseUrl"),
    ] {
        assert_eq!(references(&env[k]), vec![p.to_string()], "{id}: {k}");
    }
    // The lane is decided where images are resized.
    for binary in [RESIZE, RECONCILE, ANALYZE, BATCH] {
        let (id, f) = t.function(binary);
        let env = t.env(f);
        assert_eq!(references(&env["SIGHTLINE_LANE"]), vec!["Lane"], "{id}");
        assert_eq!(
            references(&env["SIGHTLINE_BATCH_KEY_PREFIXES"]),
            vec!["BatchUploadPrefixes"],
            "{id}"
        );
    }
    // Every SIGHTLINE_ variable it gets is a setting the code knows (or one of AwsEnv's).
    let known: BTreeSet<&str> = sightline_pipeline::settings::SETTINGS
        .iter()
        .map(|d| d.env)
        .collect();
    for k in env.keys().filter(|k| k.starts_with("SIGHTLINE_BATCH")) {
        assert!(known.contains(k.as_str()), "{id}: {k} is no setting");
    }

    assert_eq!(
        t.resources_for(f, "s3:GetObject"),
        vec!["${Bucket.Arn}/resized/*"]
    );
    assert!(t.resources_for(f, "s3:PutObject").is_empty());
    assert_eq!(
        t.resources_for(f, "sqs:SendMessage"),
        vec!["${AnalyzeQueue.Arn}"]
    );
    assert!(t.resources_for(f, "sqs:ReceiveMessage").is_empty());
    let q = t.resources_for(f, "dynamodb:Query");
    assert!(
        q.iter().any(|r| r == "${Table.Arn}/index/*"),
        "{id} queries the GSIs (pending items, open batches)"
    );
    let alarms = t.of_type("AWS::CloudWatch::Alarm");
    assert!(
        alarms.iter().any(|(_, a)| {
            let p = &a["Properties"];
            p["MetricName"] == "Errors"
                && as_list(&p["Dimensions"])
                    .iter()
                    .any(|d| Template::target(&d["Value"]) == id)
        }),
        "an alarm on {id} Errors"
    );
}

/// Lambda's log controls take effect: JSON lines (Lambda filters them by their "level"), an
/// application log level the functions also read (AWS_LAMBDA_LOG_LEVEL) and no RUST_LOG next to
/// it; and no level above INFO, because Lambda counts the metric (EMF) lines, which carry no
/// level, as INFO and would drop them.
#[test]
fn functions_log_json_at_a_level_that_keeps_the_metric_lines() {
    let t = Template::load();
    let keeps_metrics = ["TRACE", "DEBUG", "INFO"];
    for binary in ALL {
        let (id, f) = t.function(binary);
        let own = &f["Properties"]["LoggingConfig"];
        let global = &t.t["Globals"]["Function"]["LoggingConfig"];
        let pick = |key: &str| {
            if own[key].is_null() {
                global[key].clone()
            } else {
                own[key].clone()
            }
        };
        assert_eq!(pick("LogFormat"), "JSON", "{id}");
        let level = pick("ApplicationLogLevel");
        let allowed: Vec<Value> = match level.get("Ref").and_then(Value::as_str) {
            Some(p) => {
                let param = t.parameter(p);
                assert_eq!(param["Default"], "INFO", "{id}: {p} default");
                as_list(&param["AllowedValues"])
            }
            None => vec![level.clone()],
        };
        assert!(!allowed.is_empty(), "{id}: ApplicationLogLevel is set");
        for v in allowed {
            assert!(
                v.as_str().is_some_and(|l| keeps_metrics.contains(&l)),
                "{id}: ApplicationLogLevel {v} would drop the EMF metric lines"
            );
        }
        assert!(
            !t.env(f).contains_key("RUST_LOG"),
            "{id}: RUST_LOG would add its own directives to AWS_LAMBDA_LOG_LEVEL"
        );
    }
}

/// A dashboard body with every `${Name}` / `${Name.Attr}` of its Fn::Sub replaced by the name
/// (so it parses as JSON), and the names.
fn dashboard(t: &Template) -> (Value, BTreeSet<String>) {
    let dashboards = t.of_type("AWS::CloudWatch::Dashboard");
    assert_eq!(dashboards.len(), 1, "one dashboard");
    let body = &dashboards[0].1["Properties"]["DashboardBody"];
    let text = body["Fn::Sub"]
        .as_str()
        .expect("DashboardBody is a Fn::Sub string");
    let mut names = BTreeSet::new();
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let name = &rest[start + 2..end];
        names.insert(name.to_string());
        out.push_str(name);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    let json: Value = serde_json::from_str(&out).expect("DashboardBody is JSON");
    (json, names)
}

/// A metric a dashboard widget shows.
struct MetricRow {
    namespace: String,
    name: String,
    /// (dimension, value); a SEARCH gives its schema's dimension names with empty values.
    dims: Vec<(String, String)>,
}

/// Every metric row of the dashboard's widgets; SEARCH expressions give their namespace and
/// MetricName with their dimension names.
fn dashboard_metrics(body: &Value) -> Vec<MetricRow> {
    let mut out = Vec::new();
    for w in body["widgets"].as_array().expect("widgets") {
        for row in as_list(&w["properties"]["metrics"]) {
            let row = row.as_array().expect("metric row").clone();
            if let Some(expr) = row
                .first()
                .and_then(|o| o.get("expression"))
                .and_then(Value::as_str)
            {
                let schema = expr
                    .split_once('{')
                    .and_then(|(_, r)| r.split_once('}'))
                    .map(|(s, _)| s)
                    .expect("SEARCH schema");
                let mut parts = schema.split(',').map(str::trim);
                let ns = parts.next().unwrap_or_default().to_string();
                let dims = parts.map(|d| (d.to_string(), String::new())).collect();
                let name = expr
                    .split_once("MetricName=\"")
                    .and_then(|(_, r)| r.split_once('"'))
                    .map(|(n, _)| n.to_string())
                    .expect("SEARCH names its MetricName");
                out.push(MetricRow {
                    namespace: ns,
                    name,
                    dims,
                });
                continue;
            }
            let strings: Vec<String> = row
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            assert!(strings.len() >= 2, "metric row {row:?}");
            assert!(
                strings[0] != ".",
                "write metric rows out in full (no \".\" shorthand): {row:?}"
            );
            let dims = strings[2..]
                .chunks(2)
                .map(|c| (c[0].clone(), c.get(1).cloned().unwrap_or_default()))
                .collect();
            out.push(MetricRow {
                namespace: strings[0].clone(),
                name: strings[1].clone(),
                dims,
            });
        }
    }
    out
}

/// The dashboard shows what the functions emit, by the names the code uses, plus the queues'
/// depth and age, the dead letters and the functions' errors.
#[test]
fn dashboard_shows_every_emitted_metric_and_the_queues_and_errors() {
    use sightline_pipeline::metrics::{Metric, FUNCTION_DIMENSION, MODEL_DIMENSION, NAMESPACE};

    let t = Template::load();
    let (body, names) = dashboard(&t);
    let mut known: BTreeSet<String> = t.resources().keys().cloned().collect();
    known.insert("AWS::Region".into());
    for n in &names {
        let base = n.split('.').next().unwrap_or(n);
        assert!(known.contains(base), "dashboard refers to unknown {n}");
    }
    let functions: BTreeSet<String> = t
        .of_type("AWS::Serverless::Function")
        .into_iter()
        .map(|(id, _)| id.to_string())
        .collect();
    let rows = dashboard_metrics(&body);
    let mut shown = BTreeSet::new();
    for MetricRow {
        namespace,
        name,
        dims,
    } in &rows
    {
        if namespace != NAMESPACE {
            continue;
        }
        let metric = Metric::from_name(name)
            .unwrap_or_else(|| panic!("dashboard metric {name} is not emitted by the code"));
        shown.insert(metric);
        assert!(
            dims.iter().any(|(k, _)| k == FUNCTION_DIMENSION),
            "{name}: by {FUNCTION_DIMENSION}"
        );
        for (k, v) in dims {
            match k.as_str() {
                k if k == FUNCTION_DIMENSION => assert!(
                    v.is_empty() || functions.contains(v),
                    "{name}: {FUNCTION_DIMENSION} {v} is not a function of the template"
                ),
                k if k == MODEL_DIMENSION => {
                    assert!(metric.by_model(), "{name} is not emitted per model")
                }
                other => panic!("{name}: the code emits no dimension {other}"),
            }
        }
    }
    for m in Metric::ALL {
        assert!(
            shown.contains(&m),
            "{} is emitted but not on the dashboard",
            m.name()
        );
    }

    let has = |ns: &str, metric: &str, dim: &str, target: &str| {
        rows.iter().any(|r| {
            r.namespace == ns
                && r.name == metric
                && r.dims
                    .iter()
                    .any(|(k, v)| k == dim && v.starts_with(target))
        })
    };
    for metric in [
        "ApproximateNumberOfMessagesVisible",
        "ApproximateAgeOfOldestMessage",
    ] {
        assert!(
            has("AWS/SQS", metric, "QueueName", "AnalyzeQueue."),
            "{metric}"
        );
    }
    assert!(has(
        "AWS/SQS",
        "ApproximateNumberOfMessagesVisible",
        "QueueName",
        "DeadLetterQueue."
    ));
    for f in &functions {
        assert!(has("AWS/Lambda", "Errors", "FunctionName", f), "{f} errors");
    }
    // The alarms are on it too, the dead-letter one first among them.
    let alarms: Vec<String> = body["widgets"]
        .as_array()
        .expect("widgets")
        .iter()
        .filter(|w| w["type"] == "alarm")
        .flat_map(|w| as_list(&w["properties"]["alarms"]))
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    assert!(
        alarms.contains(&"DeadLetterQueueAlarm.Arn".to_string()),
        "{alarms:?}"
    );
}

/// The vector bucket and the default model's index: encrypted, float32 and cosine (the port's
/// distance), named as the code names the index; its name reaches exactly the functions that
/// use vectors, whose roles act on this bucket's indexes only, each what it needs.
#[test]
fn vector_bucket_and_index_with_least_privilege() {
    let t = Template::load();
    let buckets = t.of_type("AWS::S3Vectors::VectorBucket");
    assert_eq!(buckets.len(), 1, "one vector bucket");
    let (bucket_id, bucket) = buckets[0];
    let bp = &bucket["Properties"];
    assert_eq!(bp["EncryptionConfiguration"]["SseType"], "AES256");
    let indexes = t.of_type("AWS::S3Vectors::Index");
    assert_eq!(indexes.len(), 1, "the default model's index");
    let ip = &indexes[0].1["Properties"];
    assert_eq!(references(&ip["VectorBucketArn"]), vec![bucket_id]);
    assert_eq!(ip["DataType"], "float32");
    assert_eq!(ip["DistanceMetric"], "cosine");
    assert!(
        ip["MetadataConfiguration"].is_null(),
        "every metadata key is filterable (tenant and tags are filtered on)"
    );
    assert_eq!(references(&ip["Dimension"]), vec!["EmbeddingDimension"]);
    let dims = t.number(&ip["Dimension"]);
    assert!((1.0..=4096.0).contains(&dims));
    // The defaults are the offline embedder's model and vector length.
    assert_eq!(
        t.parameter("EmbeddingModel")["Default"],
        sightline_core::embed::LOCAL_EMBED_MODEL
    );
    assert_eq!(dims as usize, sightline_core::embed::LOCAL_EMBED_DIMS);

    // The template's index name is the one the code derives (VectorIndex::name), for the
    // defaults and for any model name the parameter's pattern admits at its longest.
    let model = &t.parameter("EmbeddingModel")["Default"];
    let name = render(&ip["IndexName"])
        .replace("${EmbeddingModel}", model.as_str().expect("model"))
        .replace("${EmbeddingDimension}", &(dims as u32).to_string());
    assert_eq!(
        name,
        sightline_pipeline::ports::VectorIndex::new(model.as_str().expect("model"), dims as u32)
            .name()
    );
    let pattern = t.parameter("EmbeddingModel")["AllowedPattern"]
        .as_str()
        .expect("pattern");
    assert_eq!(
        pattern, "^[a-z0-9][a-z0-9.-]{0,40}$",
        "the case checked below"
    );
    let longest = format!("m{}", "a.-".repeat(14).chars().take(40).collect::<String>());
    assert_eq!(
        sightline_pipeline::ports::VectorIndex::new(longest.as_str(), 4096).name(),
        format!("{longest}-4096")
    );

    // The functions that use vectors get the bucket's name; the others neither it nor rights.
    for binary in ALL {
        let (id, f) = t.function(binary);
        let env = t.env(f);
        let grants: Vec<(Vec<String>, Vec<String>, Value)> = t
            .role_grants(f)
            .into_iter()
            .filter(|(a, _, _)| a.iter().any(|a| a.starts_with("s3vectors:")))
            .collect();
        if ![ANALYZE, API, BATCH, RECONCILE].contains(&binary) {
            assert!(!env.contains_key("SIGHTLINE_VECTOR_BUCKET"), "{id}");
            assert!(grants.is_empty(), "{id}: {grants:?}");
            continue;
        }
        assert_eq!(
            env["SIGHTLINE_VECTOR_BUCKET"], bp["VectorBucketName"],
            "{id}: the vector bucket's own name"
        );
        for (actions, resources, _) in &grants {
            assert!(
                actions.iter().all(|a| a.starts_with("s3vectors:")),
                "{id}: {actions:?}"
            );
            for r in resources {
                let on_bucket = r == &format!("${{{bucket_id}.VectorBucketArn}}");
                let on_indexes = r == &format!("${{{bucket_id}.VectorBucketArn}}/index/*");
                assert!(on_bucket || on_indexes, "{id}: s3vectors on {r}");
                // Listing indexes is a bucket action; everything else acts on an index.
                for a in actions {
                    assert_eq!(a == "s3vectors:ListIndexes", on_bucket, "{id}: {a} on {r}");
                }
            }
        }
        let actions: BTreeSet<&str> = grants
            .iter()
            .flat_map(|(a, _, _)| a.iter().map(String::as_str))
            .collect();
        // The analyzer and the batch lane write vectors (and query them for near-duplicate
        // skip); the api reads and deletes them.
        let expected: BTreeSet<&str> = if [ANALYZE, BATCH, RECONCILE].contains(&binary) {
            [
                "s3vectors:ListIndexes",
                "s3vectors:CreateIndex",
                "s3vectors:GetIndex",
                "s3vectors:PutVectors",
                "s3vectors:GetVectors",
                "s3vectors:DeleteVectors",
                // Near-duplicate skip queries before the analysis call.
                "s3vectors:QueryVectors",
            ]
            .into()
        } else {
            [
                "s3vectors:ListIndexes",
                "s3vectors:QueryVectors",
                "s3vectors:GetVectors",
                "s3vectors:GetIndex",
                "s3vectors:DeleteVectors",
            ]
            .into()
        };
        assert_eq!(actions, expected, "{id}");
    }
}

/// Bedrock is reached with the functions' own roles (no key): InvokeModel on foundation models
/// and inference profiles, granted only under the stack's Bedrock conditions, to the functions
/// that call it: analyze and batch (provider or embedder), api (embedder: search queries).
#[test]
fn bedrock_is_invoked_only_under_its_conditions_with_the_functions_roles() {
    let t = Template::load();
    for binary in ALL {
        let (id, f) = t.function(binary);
        let grants: Vec<(Vec<String>, Vec<String>, Value)> = t
            .role_grants(f)
            .into_iter()
            .filter(|(a, _, _)| a.iter().any(|a| a.starts_with("bedrock:")))
            .collect();
        if binary == GENERATE {
            // Rows may name Bedrock's image models whatever the stack's provider: those two
            // families only, unconditionally.
            assert_eq!(grants.len(), 1, "{id}");
            assert_eq!(grants[0].0, vec!["bedrock:InvokeModel".to_string()], "{id}");
            assert_eq!(
                grants[0].1,
                vec![
                    "arn:${AWS::Partition}:bedrock:*::foundation-model/amazon.nova-canvas-*",
                    "arn:${AWS::Partition}:bedrock:*::foundation-model/amazon.titan-image-generator-*",
                ],
                "{id}"
            );
            continue;
        }
        let expected_condition = match binary {
            ANALYZE | BATCH | RECONCILE => Some("UsesBedrock"),
            API => Some("BedrockEmbedder"),
            _ => None,
        };
        let Some(condition) = expected_condition else {
            assert!(grants.is_empty(), "{id}: {grants:?}");
            continue;
        };
        assert_eq!(grants.len(), 1, "{id}");
        let (actions, resources, _) = &grants[0];
        assert_eq!(actions, &vec!["bedrock:InvokeModel".to_string()], "{id}");
        assert_eq!(
            resources,
            &vec![
                "arn:${AWS::Partition}:bedrock:*::foundation-model/*".to_string(),
                "arn:${AWS::Partition}:bedrock:*:${AWS::AccountId}:inference-profile/*".to_string(),
            ],
            "{id}"
        );
        let role = t.resource(&Template::target(&f["Properties"]["Role"]));
        let text = serde_json::to_string(&role["Properties"]["Policies"]).expect("json");
        assert!(
            text.contains(&format!(
                "{{\"Fn::If\":[\"{condition}\",{{\"Action\":[\"bedrock:InvokeModel\"]"
            )),
            "{id}: granted under {condition}: {text}"
        );
    }
    // The provider and the embedder reach the functions as settings.
    let (_, analyze) = t.function(ANALYZE);
    let env = t.env(analyze);
    assert_eq!(references(&env["SIGHTLINE_EMBEDDER"]), vec!["Embedder"]);
    assert_eq!(
        references(&env["SIGHTLINE_EMBEDDING_MODEL"]),
        vec!["EmbeddingModel"]
    );
    assert_eq!(
        references(&env["SIGHTLINE_EMBEDDING_DIMS"]),
        vec!["EmbeddingDimension"]
    );
    assert!(render(&env["SIGHTLINE_PROVIDER"]).contains("bedrock"));
}

/// The generate function: the generation queue's records with partial batch responses, a
/// visibility of at least 6 x its timeout, a timeout that fits a row's worst case with one
/// fallback model, a dead-letter queue after SIGHTLINE_MAX_RECEIVES receives with an alarm; CSV
/// drops under generations/ (never a key it writes itself), failed drops to their own queue.
#[test]
fn generate_function_consumes_its_queue_and_takes_csv_drops_it_cannot_trigger_itself() {
    let t = Template::load();
    let (id, f) = t.function(GENERATE);
    let sqs = t.events(f, "SQS");
    assert_eq!(sqs.len(), 1, "{id}: one SQS source");
    let ev = sqs[0].1;
    let queue_id = Template::target(&ev["Queue"]);
    assert_eq!(queue_id, "GenerationQueue");
    assert!(as_list(&ev["FunctionResponseTypes"]).contains(&Value::from("ReportBatchItemFailures")));
    let max = &ev["ScalingConfig"]["MaximumConcurrency"];
    assert!(t.number(max) >= 2.0);
    let env = t.env(f);
    assert_eq!(
        &env["SIGHTLINE_MAX_CONCURRENCY"], max,
        "the limit is shared by as many"
    );
    assert_eq!(
        references(&env["SIGHTLINE_GENERATION_QUEUE_URL"]),
        vec!["GenerationQueue"]
    );
    assert_eq!(
        references(&env["SIGHTLINE_GENERATION_IPM"]),
        vec!["GenerationIpm"]
    );
    assert_eq!(
        references(&env["SIGHTLINE_GENERATION_FALLBACK_MODELS"]),
        vec!["GenerationFallbackModels"]
    );

    let timeout = t.number(t.function_prop(f, "Timeout"));
    let worst = |fallbacks: usize| {
        let s = sightline_pipeline::Settings {
            generation_fallback_models: vec!["m".into(); fallbacks],
            ..sightline_pipeline::Settings::defaults_for(
                sightline_pipeline::settings::Runtime::Lambda,
            )
        };
        s.generation_worst_case().as_secs_f64()
    };
    assert!(
        worst(1) <= timeout && timeout <= 900.0,
        "{id}: timeout {timeout} s for a worst case of {} s",
        worst(1)
    );
    let queue = t.resource(&queue_id);
    let visibility = t.number(&queue["Properties"]["VisibilityTimeout"]);
    assert!(
        visibility >= 6.0 * timeout,
        "{queue_id}: {visibility} < 6 x {timeout}"
    );
    let redrive = &queue["Properties"]["RedrivePolicy"];
    assert_eq!(
        render(&env["SIGHTLINE_MAX_RECEIVES"]),
        render(&redrive["maxReceiveCount"]),
        "the last receive fails the row"
    );
    let dlq = Template::target(&redrive["deadLetterTargetArn"]);
    assert!(t.resource(&dlq)["Properties"]["RedrivePolicy"].is_null());
    let alarmed = |queue: &str| {
        t.of_type("AWS::CloudWatch::Alarm").iter().any(|(_, a)| {
            let p = &a["Properties"];
            p["Namespace"] == "AWS/SQS"
                && t.number(&p["Threshold"]) == 0.0
                && as_list(&p["Dimensions"])
                    .iter()
                    .any(|d| Template::target(&d["Value"]) == queue)
        })
    };
    assert!(alarmed(&dlq), "an alarm on {dlq}");

    // CSV drops: the generations/ prefix and the .csv suffix.
    let s3 = t.events(f, "S3");
    assert_eq!(s3.len(), 1, "{id}: one S3 event");
    let rules: BTreeMap<String, String> = as_list(&s3[0].1["Filter"]["S3Key"]["Rules"])
        .iter()
        .map(|r| (render(&r["Name"]).to_lowercase(), render(&r["Value"])))
        .collect();
    assert_eq!(
        rules.get("prefix").map(String::as_str),
        Some(sightline_pipeline::generation::DROP_PREFIX)
    );
    assert_eq!(rules.get("suffix").map(String::as_str), Some(".csv"));
    // What it writes never matches the drop filter (nor does resize's output).
    let puts = t.resources_for(f, "s3:PutObject");
    assert_eq!(puts.len(), 4, "{puts:?}");
    for r in &puts {
        let key = r.split_once("}/").map(|(_, k)| k).unwrap_or(r);
        assert!(
            !key.starts_with("generations/") || key.ends_with(".result.json"),
            "{id}: s3:PutObject on {r}"
        );
    }
    assert!(
        puts.iter().any(|r| r.ends_with("/uploads/*")),
        "generated images are uploads"
    );
    // The same object's events go to one function only: the prefixes do not overlap.
    let (_, resize) = t.function(RESIZE);
    let resize_prefix =
        render(&as_list(&t.events(resize, "S3")[0].1["Filter"]["S3Key"]["Rules"])[0]["Value"]);
    assert!(
        !resize_prefix.starts_with("generations/") && !"generations/".starts_with(&resize_prefix)
    );
    // A drop that keeps failing lands in its own queue, with an alarm.
    let dest = &f["Properties"]["EventInvokeConfig"]["DestinationConfig"]["OnFailure"];
    let dest_id = Template::target(&dest["Destination"]);
    assert_eq!(
        t.resources_for(f, "sqs:SendMessage"),
        vec![
            "${GenerationQueue.Arn}".to_string(),
            format!("${{{dest_id}.Arn}}")
        ]
    );
    assert!(alarmed(&dest_id), "an alarm on {dest_id}");
    for a in [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "sqs:ChangeMessageVisibility",
    ] {
        assert_eq!(
            t.resources_for(f, a),
            vec!["${GenerationQueue.Arn}"],
            "{id} {a}"
        );
    }
    // The functions that move rows on or submit jobs know the generation queue.
    for binary in [ANALYZE, API, RECONCILE] {
        let (other, g) = t.function(binary);
        assert_eq!(
            references(&t.env(g)["SIGHTLINE_GENERATION_QUEUE_URL"]),
            vec!["GenerationQueue"],
            "{other}"
        );
    }
    for binary in [API, RECONCILE] {
        let (other, g) = t.function(binary);
        assert_eq!(
            references(&t.env(g)[WEBHOOK_SECRETS_PATH.0]),
            vec![WEBHOOK_SECRETS_PATH.1],
            "{other}"
        );
    }
}
