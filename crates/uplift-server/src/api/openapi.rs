//! The admin API's OpenAPI 3 document, generated from the handlers'
//! `#[utoipa::path]` attributes and the schemas of the `uplift-proto`
//! types (its `openapi` feature), and served without authentication at
//! [`OPENAPI_PATH`]: it is the API's shape, not data.
//!
//! The refusals that follow from how the admin router is built, not from
//! what one handler does, are added here in one place instead of on every
//! handler: 401 (the authentication middleware), 403 (a role without the
//! permission named in the operation's security requirement; an
//! enrollment token has none of them), 503 `server_busy` (the admin budget)
//! and 500 on every operation, 400 where there is input to refuse, and 413
//! where there is a body.

use super::*;
use std::sync::LazyLock;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, RefOr, ResponseBuilder, Schema};
use utoipa::OpenApi as _;

/// The name of the bearer security scheme; its scopes name the permission
/// an operation needs (`read`, `operate`, `release`, `administer`), which
/// `Role::allows` maps to roles.
const BEARER: &str = "bearer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Uplift admin API",
        description = "The admin REST API of an Uplift server: devices, releases, rollouts, \
                       tokens, the audit log, events and webhooks. Every call takes \
                       `Authorization: Bearer <API token>`; the security requirement of an \
                       operation names the permission it needs. Every error is \
                       `{\"kind\": ..., \"message\": ...}` (`WireError`)."
    ),
    paths(
        list_devices,
        show_device,
        remove_device,
        tag_device,
        device_history,
        enrollment::list_enrollments,
        enrollment::accept_enrollment,
        enrollment::reject_enrollment,
        fleet_summary,
        list_releases,
        upload_release,
        missing_chunks,
        upload_chunk,
        upload_patch,
        upload_index,
        list_rollouts,
        start_rollout,
        preview_rollout,
        show_rollout,
        rollout_members,
        command_rollout,
        stats,
        metrics,
        list_tokens,
        create_token,
        revoke_token,
        audit_log,
        whoami,
        event_stream,
        list_webhooks,
        create_webhook,
        remove_webhook,
        webhook_deliveries,
        roots::list_roots,
        roots::publish_root,
    ),
    // Path and query parameters' types are not collected from the paths
    // by utoipa;
    // fleet events are the stream's and webhooks' payload.
    components(schemas(
        WireError,
        DeviceId,
        ChunkHash,
        RolloutCommandName,
        uplift_proto::api::MemberOutcome,
        uplift_proto::events::FleetEvent
    )),
    modifiers(&RouterRefusals),
    tags(
        (name = "devices", description = "The fleet: summary, list, show, tag, history"),
        (name = "releases", description = "Releases and their chunks, patches and indexes"),
        (name = "rollouts", description = "Rollouts and the commands that steer them"),
        (name = "monitoring", description = "Counters and Prometheus metrics"),
        (name = "access", description = "API tokens, the audit log, the caller"),
        (name = "events", description = "The event stream and webhooks"),
    )
)]
struct ApiDoc;

/// An opaque binary request body (chunks, patches, indexes).
#[derive(Debug)]
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Binary,
            )))
            .into()
    }
}

impl utoipa::ToSchema for Binary {}

/// The refusals the admin router gives whatever the handler: see the module
/// documentation. Each is a shared response component with a `WireError`.
struct RouterRefusals;

/// A refusal the router gives: its status, the name of its response
/// component, what it means, and which operations can get it.
struct Refusal {
    status: &'static str,
    name: &'static str,
    description: &'static str,
    applies: fn(&Operation) -> bool,
}

const REFUSALS: &[Refusal] = &[
    Refusal {
        status: "400",
        name: "BadRequest",
        description: "`bad_request` (or a narrower kind, e.g. `manifest_invalid`): a path \
                      segment, query parameter or body is not valid; the message names it",
        applies: |op| {
            op.parameters.as_ref().is_some_and(|p| !p.is_empty()) || op.request_body.is_some()
        },
    },
    Refusal {
        status: "401",
        name: "Unauthorized",
        description: "`unauthorized`: the API token is missing, wrong, expired or revoked",
        applies: |_| true,
    },
    Refusal {
        status: "403",
        name: "Forbidden",
        description: "`forbidden`: the token's role does not have the permission this needs",
        applies: |_| true,
    },
    Refusal {
        status: "413",
        name: "PayloadTooLarge",
        description: "`payload_too_large`: the body is larger than the server accepts here",
        applies: |op| op.request_body.is_some(),
    },
    Refusal {
        status: "500",
        name: "Internal",
        description: "`internal` or `storage`: the server failed; its log says why",
        applies: |_| true,
    },
    Refusal {
        status: "503",
        name: "ServerBusy",
        description:
            "`server_busy`: the server is at its budget for admin requests (or event streams); \
         try again later. `object_store_unavailable`: the object store holding chunks \
         (`[artifacts] backend = \"s3\"`) did not answer; try again once it is back",
        applies: |_| true,
    },
];

impl utoipa::Modify for RouterRefusals {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.security_schemes.insert(
            BEARER.to_owned(),
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token: the server's bootstrap admin token or one made with \
                         POST /api/v1/tokens",
                    ))
                    .build(),
            ),
        );
        for refusal in REFUSALS {
            let response = ResponseBuilder::new()
                .description(refusal.description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("WireError")))
                        .build(),
                )
                .build();
            components
                .responses
                .insert(refusal.name.to_owned(), RefOr::T(response));
        }
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for op in operations.into_iter().flatten() {
                for refusal in REFUSALS {
                    if (refusal.applies)(op) {
                        // A handler's own description of a status stays.
                        op.responses
                            .responses
                            .entry(refusal.status.to_owned())
                            .or_insert_with(|| {
                                RefOr::Ref(Ref::new(format!(
                                    "#/components/responses/{}",
                                    refusal.name
                                )))
                            });
                    }
                }
            }
        }
    }
}

/// The document, as the server serves it.
pub fn document() -> Document {
    ApiDoc::openapi()
}

/// `GET /api/v1/openapi.json`: built once, then served as bytes.
pub async fn serve() -> Response {
    static JSON: LazyLock<Bytes> = LazyLock::new(|| {
        Bytes::from(
            document()
                .to_pretty_json()
                .expect("the OpenAPI document serializes"),
        )
    });
    ([(header::CONTENT_TYPE, "application/json")], JSON.clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing;
    use axum::http::{Method, Request};
    use std::collections::BTreeSet;
    use tower::ServiceExt as _;

    /// Every route of the admin router, as `admin_routes` builds it: a
    /// route added there and not documented fails here.
    const ADMIN_ROUTES: &[(&str, &str)] = &[
        ("GET", "/api/v1/devices"),
        ("GET", "/api/v1/devices/{id}"),
        ("DELETE", "/api/v1/devices/{id}"),
        ("PUT", "/api/v1/devices/{id}/tags"),
        ("GET", "/api/v1/devices/{id}/history"),
        ("GET", "/api/v1/enrollments"),
        ("POST", "/api/v1/enrollments/{id}/accept"),
        ("POST", "/api/v1/enrollments/{id}/reject"),
        ("GET", "/api/v1/fleet"),
        ("GET", "/api/v1/releases"),
        ("POST", "/api/v1/releases"),
        ("POST", "/api/v1/chunks/missing"),
        ("PUT", "/api/v1/chunks/{hash}"),
        ("PUT", "/api/v1/patches/{hash}"),
        ("PUT", "/api/v1/indexes/{hash}"),
        ("GET", "/api/v1/rollouts"),
        ("POST", "/api/v1/rollouts"),
        ("POST", "/api/v1/rollouts/preview"),
        ("GET", "/api/v1/rollouts/{id}"),
        ("GET", "/api/v1/rollouts/{id}/devices"),
        ("POST", "/api/v1/rollouts/{id}/{command}"),
        ("GET", "/api/v1/stats"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/tokens"),
        ("POST", "/api/v1/tokens"),
        ("DELETE", "/api/v1/tokens/{id}"),
        ("GET", "/api/v1/audit"),
        ("GET", "/api/v1/whoami"),
        ("GET", "/api/v1/roots"),
        ("POST", "/api/v1/roots"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/webhooks"),
        ("POST", "/api/v1/webhooks"),
        ("DELETE", "/api/v1/webhooks/{id}"),
        ("GET", "/api/v1/webhooks/{id}/deliveries"),
    ];

    const METHODS: [&str; 4] = ["GET", "PUT", "POST", "DELETE"];

    fn documented() -> BTreeSet<(String, String)> {
        let json = serde_json::to_value(document()).unwrap();
        let mut ops = BTreeSet::new();
        for (path, item) in json["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method.to_lowercase()).is_some() {
                    ops.insert((method.to_owned(), path.clone()));
                }
            }
        }
        ops
    }

    /// A path of the document with a well-formed value in each parameter.
    fn concrete(path: &str) -> String {
        path.replace("{id}", "1")
            .replace("{hash}", &"ab".repeat(32))
            .replace("{command}", "pause")
    }

    #[test]
    fn the_document_is_openapi_3_and_every_reference_resolves() {
        let text = document().to_pretty_json().unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            json["openapi"].as_str().unwrap().starts_with("3."),
            "{}",
            json["openapi"]
        );
        if let Ok(out) = std::env::var("UPLIFT_OPENAPI_DUMP") {
            std::fs::write(out, &text).unwrap();
        }
        fn refs(value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, v) in map {
                        match (key.as_str(), v) {
                            ("$ref", serde_json::Value::String(r)) => out.push(r.clone()),
                            _ => refs(v, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        refs(&json, &mut found);
        assert!(!found.is_empty());
        for reference in found {
            let pointer = reference.strip_prefix('#').expect("a local reference");
            assert!(
                json.pointer(pointer).is_some(),
                "{reference} does not resolve"
            );
        }
        // Limits stated in uplift-proto for the document are the server's.
        let expiry = &json["components"]["schemas"]["TokenCreate"]["properties"]["expires_in_secs"];
        assert_eq!(
            expiry["maximum"].as_u64(),
            Some(crate::service::tokens::MAX_EXPIRES_IN_SECS)
        );
        let uses = &json["components"]["schemas"]["TokenCreate"]["properties"]["max_uses"];
        assert_eq!(
            uses["maximum"].as_u64(),
            Some(u64::from(crate::service::tokens::MAX_TOKEN_USES))
        );
        // Every operation says what it needs and how it refuses.
        for (method, path) in documented() {
            let op = &json["paths"][&path][method.to_lowercase()];
            assert!(op["security"][0]["bearer"].is_array(), "{method} {path}");
            for status in ["401", "403", "500", "503"] {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path} {status}"
                );
            }
        }
    }

    #[test]
    fn the_document_lists_exactly_the_admin_routes() {
        let listed: BTreeSet<(String, String)> = ADMIN_ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        assert_eq!(documented(), listed);
    }

    /// Each documented operation is answered by the real router as a route
    /// (not the 404 or 405 fallbacks), and each other method on its path
    /// is a 405: so the document has no route the router lacks, and no
    /// path of it takes an undocumented method.
    #[tokio::test]
    async fn the_router_answers_every_documented_operation_and_no_other_method() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(testing::state(dir.path()).await);
        let router = admin_router(state);
        let ops = documented();
        let paths: BTreeSet<&String> = ops.iter().map(|(_, p)| p).collect();
        for path in paths {
            for method in METHODS {
                let request = Request::builder()
                    .method(Method::from_bytes(method.as_bytes()).unwrap())
                    .uri(concrete(path))
                    .header(header::AUTHORIZATION, "Bearer admin")
                    .body(Body::empty())
                    .unwrap();
                let response = router.clone().oneshot(request).await.unwrap();
                let status = response.status();
                let body =
                    if status == StatusCode::OK && method == "GET" && path.ends_with("events") {
                        String::new() // a stream that does not end
                    } else {
                        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                            .await
                            .unwrap();
                        String::from_utf8_lossy(&bytes).into_owned()
                    };
                if ops.contains(&(method.to_owned(), path.clone())) {
                    assert!(
                        status != StatusCode::METHOD_NOT_ALLOWED
                            && !body.contains("no such endpoint"),
                        "{method} {path}: {status} {body}"
                    );
                } else {
                    assert_eq!(
                        status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{method} {path}: {body}"
                    );
                }
            }
        }
        let public = Request::get(OPENAPI_PATH).body(Body::empty()).unwrap();
        let response = admin_router(Arc::new(testing::state(dir.path()).await))
            .oneshot(public)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "served without a token");
    }
}
