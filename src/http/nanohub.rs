//! NanoHUB-compatible routes (contract.md §3.1): same paths under `/api/v1/nanomdm`, same
//! request and response shapes, so existing NanoMDM/NanoHUB scripts work unchanged.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::body::read_body;
use super::endpoint::Endpoint;
use super::rejection::Rejection;
use super::AppState;
use crate::commands::{self, Delivery};
use crate::identity::PushCertificate;
use crate::protocol::command::inspect_command;
use crate::push::{PushOutcome, TopicStatus};
use crate::store::{Mutation, PushCertRecord, StoredCommand};

/// The NanoHUB routes, relative to `/api/v1`.
pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new("/nanomdm/pushcert")
            .put(upload_push_cert)
            .get(get_push_cert),
        Endpoint::new("/nanomdm/enqueue/{ids}").put(enqueue),
        Endpoint::new("/nanomdm/push/{ids}").get(push).post(push),
    ]
}

/// Comma-separated enrollment ids from the last path segment; empty entries are ignored.
/// A segment too long for a URI (10,000 UDIDs run to ~370 KB) arrives aside from the URI.
pub(super) fn route_ids(req: &HttpRequest, segment: &str) -> Result<Vec<String>, Rejection> {
    if segment != actix_http::LONG_PATH_SEGMENT_MARKER {
        return split_ids(segment);
    }
    let long = req
        .extensions()
        .get::<actix_http::LongPathSegment>()
        .map(|s| {
            percent_encoding::percent_decode_str(&s.0)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    split_ids(&long)
}

fn split_ids(ids: &str) -> Result<Vec<String>, Rejection> {
    let ids: Vec<String> = ids
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return Err(Rejection::api(
            StatusCode::BAD_REQUEST,
            "no_ids",
            "no enrollment ids given",
        ));
    }
    Ok(ids)
}

pub(super) fn rfc3339(unix_secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `PUT /api/v1/nanomdm/pushcert`: PEM certificate + PEM private key, or a PKCS#12
/// export with its password in the `X-Password` header.
async fn upload_push_cert(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let body = read_body(&req, payload, &state.settings)
        .await
        .map_err(Rejection::for_api)?;
    let cert = parse_push_certificate(&req, &body)
        .map_err(|e| Rejection::api(StatusCode::BAD_REQUEST, e.reason(), e.to_string()))?;
    let record = PushCertRecord {
        topic: cert.topic.clone(),
        cert_pem: cert.cert_pem.clone(),
        key_pem: cert.key_pem.clone(),
        not_after: cert.not_after,
        uploaded_at: crate::device::now_secs(),
    };
    state
        .store
        .apply(vec![Mutation::PutPushCert(record.clone())])
        .await
        .map_err(Rejection::store_failure)?;
    state.push.certificate_changed(&record.topic);
    crate::telemetry::series::push_topic(&record.topic, record.not_after);
    tracing::info!(topic = %record.topic, "push certificate stored");
    Ok(HttpResponse::Ok().json(push_cert_json(&record, &TopicStatus::Idle)))
}

fn parse_push_certificate(
    req: &HttpRequest,
    body: &[u8],
) -> Result<PushCertificate, crate::identity::IdentityError> {
    if body.trim_ascii_start().starts_with(b"-----BEGIN") {
        return PushCertificate::from_pem(body);
    }
    let password = req
        .headers()
        .get("X-Password")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    PushCertificate::from_pkcs12(body, password)
}

/// NanoHUB's `{topic, not_after}`, plus whether Orchard is currently using the topic.
fn push_cert_json(record: &PushCertRecord, status: &TopicStatus) -> serde_json::Value {
    let mut json = serde_json::json!({
        "topic": record.topic,
        "not_after": rfc3339(record.not_after),
    });
    match status {
        TopicStatus::Stopped { reason } => {
            json["status"] = "stopped".into();
            json["stopped_reason"] = reason.clone().into();
        }
        TopicStatus::Active => json["status"] = "active".into(),
        TopicStatus::Idle => json["status"] = "idle".into(),
    }
    json
}

#[derive(Deserialize)]
struct TopicQuery {
    topic: Option<String>,
}

/// `GET /api/v1/nanomdm/pushcert?topic=`: the stored certificate's topic and expiry.
async fn get_push_cert(
    query: web::Query<TopicQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let certs = state
        .store
        .push_certs()
        .await
        .map_err(Rejection::store_failure)?;
    let found = match &query.topic {
        Some(topic) => certs.iter().find(|c| &c.topic == topic),
        None => certs.iter().max_by_key(|c| c.uploaded_at),
    };
    found
        .map(|record| {
            let status = state.push.topic_status(&record.topic);
            HttpResponse::Ok().json(push_cert_json(record, &status))
        })
        .ok_or_else(|| {
            Rejection::api(
                StatusCode::NOT_FOUND,
                "unknown_topic",
                "no push certificate for that topic",
            )
        })
}

#[derive(Deserialize)]
struct EnqueueQuery {
    nopush: Option<String>,
}

#[derive(Default, Serialize)]
struct EnrolledResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    push_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    push_result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command_error: Option<String>,
}

impl EnrolledResult {
    fn from_push(outcome: &PushOutcome) -> Self {
        match outcome {
            PushOutcome::Sent { apns_id } => EnrolledResult {
                push_result: Some(apns_id.clone()),
                ..Default::default()
            },
            PushOutcome::AlreadyPending => EnrolledResult {
                push_result: Some("pending".into()),
                ..Default::default()
            },
            PushOutcome::TokenInvalid { reason }
            | PushOutcome::NotSent { reason }
            | PushOutcome::Failed { reason } => EnrolledResult {
                push_error: Some(reason.clone()),
                ..Default::default()
            },
        }
    }
}

#[derive(Default, Serialize)]
struct EnqueueResponse {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<String, EnrolledResult>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    no_push: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    push_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command_error: Option<String>,
    command_uuid: String,
    request_type: String,
}

/// `PUT /api/v1/nanomdm/enqueue/{id,...}[?nopush=1]`: body is a raw command plist.
async fn enqueue(
    req: HttpRequest,
    ids: web::Path<String>,
    query: web::Query<EnqueueQuery>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let ids = route_ids(&req, &ids)?;
    let body = read_body(&req, payload, &state.settings)
        .await
        .map_err(Rejection::for_api)?;
    let info = inspect_command(&body).map_err(|e| Rejection::protocol(e).for_api())?;
    let no_push = query
        .nopush
        .as_deref()
        .is_some_and(|v| !v.is_empty() && v != "0");
    let command = StoredCommand {
        command_uuid: info.command_uuid.clone(),
        request_type: info.request_type.clone(),
        body: body.to_vec(),
    };
    let deliveries = commands::enqueue(
        &state.registry,
        &*state.store,
        &*state.push,
        &ids,
        command,
        0,
        !no_push,
    )
    .await
    .map_err(Rejection::store_failure)?;
    let status = enqueue_status(&deliveries);
    let failed = deliveries.iter().filter(|d| d.queued.is_err()).count();
    let response = EnqueueResponse {
        status: deliveries
            .iter()
            .filter_map(|d| per_id_result(d).map(|r| (d.enrollment_id.clone(), r)))
            .collect(),
        no_push,
        command_error: (failed > 0).then(|| {
            format!(
                "{failed} of {} enrollments could not queue the command",
                deliveries.len()
            )
        }),
        push_error: None,
        command_uuid: info.command_uuid,
        request_type: info.request_type,
    };
    Ok(HttpResponse::build(status).json(response))
}

fn per_id_result(delivery: &Delivery) -> Option<EnrolledResult> {
    match (&delivery.queued, &delivery.push) {
        (Err(e), _) => Some(EnrolledResult {
            command_error: Some(e.to_string()),
            ..Default::default()
        }),
        (Ok(()), Some(outcome)) => Some(EnrolledResult::from_push(outcome)),
        (Ok(()), None) => None,
    }
}

/// 200 when every id queued the command, 207 when some did, 404/503 when none did.
fn enqueue_status(deliveries: &[Delivery]) -> StatusCode {
    let queued = deliveries.iter().filter(|d| d.queued.is_ok()).count();
    if queued == deliveries.len() {
        StatusCode::OK
    } else if queued > 0 {
        StatusCode::MULTI_STATUS
    } else if deliveries.iter().all(|d| {
        matches!(
            d.queued,
            Err(crate::device::DeviceError::UnknownEnrollment(_))
        )
    }) {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[derive(Serialize)]
struct PushResponse {
    status: BTreeMap<String, EnrolledResult>,
}

/// `GET|POST /api/v1/nanomdm/push/{id,...}`: answers once every push has an outcome.
async fn push(
    req: HttpRequest,
    ids: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let ids = route_ids(&req, &ids)?;
    let outcomes = commands::push_enrollments(&state.registry, &*state.push, &ids).await;
    let sent = outcomes
        .iter()
        .filter(|(_, o)| {
            matches!(
                o,
                Ok(PushOutcome::Sent { .. } | PushOutcome::AlreadyPending)
            )
        })
        .count();
    let status = if sent == outcomes.len() {
        StatusCode::OK
    } else if sent > 0 {
        StatusCode::MULTI_STATUS
    } else if outcomes.iter().all(|(_, o)| o.is_err()) {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::BAD_GATEWAY
    };
    let body = PushResponse {
        status: outcomes
            .iter()
            .map(|(id, outcome)| {
                let result = match outcome {
                    Ok(outcome) => EnrolledResult::from_push(outcome),
                    Err(e) => EnrolledResult {
                        push_error: Some(e.to_string()),
                        ..Default::default()
                    },
                };
                (id.clone(), result)
            })
            .collect(),
    };
    Ok(HttpResponse::build(status).json(body))
}
