//! The deployable shape of sightline, as data for tests.
//!
//! `tests/template.rs` checks the safety settings of the SAM template and `tests/openapi.rs` checks
//! the OpenAPI spec. Both files are embedded here so that other crates' tests (e.g. the router ↔
//! spec test) can use them without knowing the repository layout.

/// The SAM template (long-form intrinsics only, so plain YAML parsers can read it).
pub const TEMPLATE_YAML: &str = include_str!("../template.yaml");

/// The OpenAPI 3.0.3 description of the HTTP API.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

/// Every route (method, path) of the HTTP API: the spec and the template's HttpApi events list
/// exactly these (checked by the tests of this crate); the api router must serve exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/uploads"),
    ("GET", "/v1/images"),
    ("GET", "/v1/images/{id}"),
    ("DELETE", "/v1/images/{id}"),
    ("POST", "/v1/images/{id}/analyze"),
    ("GET", "/v1/images/{id}/similar"),
    ("GET", "/v1/search"),
    ("POST", "/v1/search"),
    ("GET", "/v1/costs"),
    ("GET", "/v1/batches"),
    ("POST", "/v1/generations"),
    ("GET", "/v1/generations"),
    ("GET", "/v1/generations/{id}"),
    ("GET", "/v1/webhooks/deliveries"),
    ("POST", "/v1/webhooks/deliveries/{id}/redeliver"),
    ("GET", "/v1/health"),
    ("PUT", "/v1/tenants/{tenant}/budget"),
    ("DELETE", "/v1/tenants/{tenant}/budget"),
];

/// Routes for operators, behind the admin key (`x-admin-key`), not a tenant's API key.
pub const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("PUT", "/v1/tenants/{tenant}/budget"),
    ("DELETE", "/v1/tenants/{tenant}/budget"),
];

/// The only route that needs no API key.
pub const PUBLIC_ROUTES: &[(&str, &str)] = &[("GET", "/v1/health")];
