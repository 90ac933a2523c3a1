//! The OpenAPI document at `/api/v1/openapi.json` is exact: it names every admin route the
//! server serves with exactly the methods served there, every refusal under `/api/v1`
//! and `/migration` is the JSON error object it documents (parse failures and unknown
//! paths included), and a method a route does not serve answers 405 with `Allow`.
//! (`.ci/api-fuzz` fuzzes the server against the document for the rest.)

mod common;

use std::collections::{BTreeMap, BTreeSet};

use actix_web::http::Method;
use common::*;
use serde_json::Value;

/// The document as the server serves it.
async fn served_document(server: &Server) -> Value {
    let response = client()
        .get(server.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(content_type_of(&response), "application/json");
    serde_json::from_slice(&body_of(response).await).expect("the document is JSON")
}

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Path -> methods, as the document lists them.
fn documented_routes(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|key| HTTP_METHODS.contains(&key.as_str()))
                .map(|method| method.to_uppercase())
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// Path -> methods, as the router is built.
fn served_routes() -> BTreeMap<String, BTreeSet<String>> {
    orchard::http::admin_routes()
        .into_iter()
        .map(|(path, methods)| (path, methods.iter().map(Method::to_string).collect()))
        .collect()
}

/// A concrete URL path for a templated one (`{id}` -> `X`).
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => in_param = true,
            '}' => {
                in_param = false;
                out.push_str("UNKNOWN-1");
            }
            _ if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

async fn request(
    server: &Server,
    method: &Method,
    path: &str,
    authorized: bool,
) -> (u16, Option<String>, String, Value) {
    let mut request = client().request(method.clone(), server.url(path));
    if authorized {
        request = request.bearer_auth(API_KEY);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let allow = response
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_string());
    let content_type = content_type_of(&response);
    let body = body_of(response).await;
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, allow, content_type, json)
}

fn assert_error_object(json: &Value, reason: &str, context: &str) {
    assert_eq!(json["error"], reason, "{context}: {json}");
    assert!(json["detail"].is_string(), "{context}: {json}");
}

#[actix_rt::test]
async fn every_served_admin_route_is_documented_with_exactly_its_methods() {
    let server = Server::start();
    let documented = documented_routes(&served_document(&server).await);
    let served = served_routes();
    for (path, methods) in &served {
        assert_eq!(
            documented.get(path),
            Some(methods),
            "{path}: served with {methods:?}, documented with {:?}",
            documented.get(path)
        );
    }
    for path in documented.keys() {
        assert!(
            served.contains_key(path),
            "{path} is documented but not served"
        );
    }
}

#[actix_rt::test]
async fn a_method_a_route_does_not_serve_answers_405_with_the_methods_it_does() {
    let server = Server::start();
    for (path, methods) in served_routes() {
        let unserved = ["GET", "PUT", "POST", "DELETE", "PATCH"]
            .into_iter()
            .filter(|m| !methods.contains(*m));
        for method in unserved {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let (status, allow, content_type, json) =
                request(&server, &method, &concrete(&path), true).await;
            let context = format!("{method} {path}");
            assert_eq!(status, 405, "{context}");
            let allowed: BTreeSet<String> = allow
                .unwrap_or_else(|| panic!("{context}: 405 without Allow"))
                .split(',')
                .map(|m| m.trim().to_string())
                .collect();
            assert_eq!(allowed, methods, "{context}: Allow");
            assert_eq!(content_type, "application/json", "{context}");
            assert_error_object(&json, "method_not_allowed", &context);
        }
    }
}

#[actix_rt::test]
async fn without_the_api_key_every_documented_operation_answers_401_as_documented() {
    let server = Server::start();
    let doc = served_document(&server).await;
    for (path, methods) in documented_routes(&doc) {
        for method in methods {
            let operation = &doc["paths"][&path][method.to_lowercase()];
            let open = operation["security"] == serde_json::json!([]);
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let (status, _, _, json) = request(&server, &method, &concrete(&path), false).await;
            let context = format!("{method} {path}");
            if open {
                assert_ne!(status, 401, "{context} needs no key");
                continue;
            }
            assert_eq!(status, 401, "{context}");
            assert_error_object(&json, "unauthorized", &context);
            assert!(
                operation["responses"]["401"].is_object(),
                "{context}: 401 documented"
            );
        }
    }
}

#[actix_rt::test]
async fn a_query_string_that_does_not_parse_is_a_json_400() {
    let server = Server::start();
    let (status, json) = api_get(&server, "/api/v1/devices?limit=many").await;
    assert_eq!(status, 400);
    assert_error_object(&json, "bad_query", "limit=many");
    let (status, json) = api_get(&server, "/api/v1/ddm/status-report/X?index=-1").await;
    assert_eq!(status, 400);
    assert_error_object(&json, "bad_index", "index=-1");
}

#[actix_rt::test]
async fn a_required_query_parameter_given_empty_is_refused_like_a_missing_one() {
    let server = Server::start();
    for path in [
        "/api/v1/ddm/set-declarations/some-set",
        "/api/v1/ddm/set-declarations/some-set?declaration=",
        "/api/v1/ddm/enrollment-sets/SOME-ID?set=",
    ] {
        let (status, _, _, json) = request(&server, &Method::DELETE, path, true).await;
        assert_eq!(status, 400, "{path}");
        assert_error_object(&json, "bad_query", path);
    }
}

#[actix_rt::test]
async fn a_limit_outside_the_documented_range_is_refused_not_clamped() {
    let server = Server::start();
    for limit in ["0", "10001"] {
        let (status, json) = api_get(&server, &format!("/api/v1/devices?limit={limit}")).await;
        assert_eq!(status, 400, "limit={limit}");
        assert_error_object(&json, "bad_limit", &format!("limit={limit}"));
    }
    let (status, _) = api_get(&server, "/api/v1/devices?limit=10000").await;
    assert_eq!(status, 200);
}

#[actix_rt::test]
async fn a_path_parameter_that_names_nothing_is_a_json_400() {
    let server = Server::start();
    for path in [
        "/api/v1/nanomdm/push/,,",
        "/api/v1/ddm/declaration-status/%20,",
    ] {
        let (status, json) = api_get(&server, path).await;
        assert_eq!(status, 400, "{path}");
        assert_error_object(&json, "no_ids", path);
    }
}

#[actix_rt::test]
async fn a_path_parameter_that_is_not_utf8_is_read_lossily_and_answered_in_json() {
    let server = Server::start();
    let (status, json) = api_get(&server, "/api/v1/devices/%FF%FE").await;
    assert_eq!(status, 404, "{json}");
    assert_error_object(&json, "unknown_enrollment", "invalid UTF-8 in the path");
}

#[actix_rt::test]
async fn a_json_body_that_does_not_parse_is_a_json_400_and_a_body_not_declared_json_a_415() {
    let server = Server::start();
    let send = |content_type: &'static str, body: &'static str| {
        client()
            .post(server.url("/api/v1/commands"))
            .bearer_auth(API_KEY)
            .insert_header(("content-type", content_type))
            .send_body(body)
    };
    let response = send("application/json", "{\"targets\": [").await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let json: Value = serde_json::from_slice(&body_of(response).await).unwrap();
    assert_error_object(&json, "bad_json", "truncated JSON");

    let response = send("application/json", "{\"targets\": 3}").await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let json: Value = serde_json::from_slice(&body_of(response).await).unwrap();
    assert_error_object(&json, "bad_json", "wrong type");

    let response = send("text/plain", "{}").await.unwrap();
    assert_eq!(response.status().as_u16(), 415);
    let json: Value = serde_json::from_slice(&body_of(response).await).unwrap();
    assert_error_object(&json, "unsupported_media_type", "text/plain");
}

#[actix_rt::test]
async fn an_empty_target_list_is_refused_as_documented() {
    let server = Server::start();
    let (status, json) = api_post_json(
        &server,
        "/api/v1/commands",
        serde_json::json!({"targets": [], "request_type": "DeviceInformation"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_error_object(&json, "no_ids", "targets: []");
    let doc = served_document(&server).await;
    assert_eq!(
        doc["components"]["schemas"]["BulkTemplateCommand"]["allOf"][1]["properties"]["targets"]
            ["minItems"],
        1
    );
}

#[actix_rt::test]
async fn an_unknown_path_under_the_api_is_a_json_404_behind_the_api_key() {
    let server = Server::start();
    let (status, json) = api_get(&server, "/api/v1/no-such-route").await;
    assert_eq!(status, 404);
    assert_error_object(&json, "unknown_path", "unknown path");
    let (status, _, _, json) = request(&server, &Method::GET, "/api/v1/no-such-route", false).await;
    assert_eq!(status, 401, "the key is checked first");
    assert_error_object(&json, "unauthorized", "unknown path without key");
}

#[actix_rt::test]
async fn every_documented_refusal_has_a_json_body_and_the_shared_ones_are_the_error_object() {
    let server = Server::start();
    let doc = served_document(&server).await;
    let responses = &doc["components"]["responses"];
    for (name, response) in responses.as_object().unwrap() {
        assert_eq!(
            response["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
            "shared response {name} is the error object"
        );
    }
    for (path, methods) in documented_routes(&doc) {
        for method in methods {
            let operation = &doc["paths"][&path][method.to_lowercase()];
            for (status, response) in operation["responses"].as_object().unwrap() {
                let response = match response["$ref"].as_str() {
                    Some(reference) => {
                        &responses[reference.trim_start_matches("#/components/responses/")]
                    }
                    None => response,
                };
                let context = format!("{method} {path} {status}");
                let code: u16 = status.parse().expect("explicit status codes only");
                assert!(response.is_object(), "{context}: defined");
                if code >= 400 {
                    let schema = &response["content"]["application/json"]["schema"];
                    assert!(schema.is_object(), "{context}: a JSON body");
                }
            }
        }
    }
}
