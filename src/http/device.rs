//! Device-facing endpoints: check-in, connect (command queue) and the enrollment profile.

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use super::body::read_body;
use super::identity::device_identity;
use super::rejection::Rejection;
use super::AppState;
use crate::device::messages::{
    Authorize, Caller, CheckinReply, HandleCheckin, HandleConnect, UnparseableResult,
};
use crate::identity::CertFingerprint;
use crate::protocol::checkin::decode_checkin;
use crate::protocol::connect::decode_connect;
use crate::protocol::ids::Channel;

const CHECKIN_CONTENT_TYPE: &str = "application/x-apple-aspen-mdm-checkin";

fn content_type(req: &HttpRequest) -> &str {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// `PUT /mdm`: a check-in if the Content-Type says so, otherwise a connect report.
pub async fn mdm(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let body = read_body(&req, payload, &state.settings).await?;
    if content_type(&req).starts_with(CHECKIN_CONTENT_TYPE) {
        checkin(&req, &body, &state).await
    } else {
        connect(&req, body, &state).await
    }
}

/// `PUT /checkin`: check-in messages only.
pub async fn checkin_only(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    if !content_type(&req).starts_with(CHECKIN_CONTENT_TYPE) {
        return Err(Rejection::device(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "wrong_content_type",
            format!(
                "/checkin takes Content-Type {CHECKIN_CONTENT_TYPE}; connect reports go to /mdm"
            ),
        ));
    }
    let body = read_body(&req, payload, &state.settings).await?;
    checkin(&req, &body, &state).await
}

/// How the channel's actor should treat the caller: device channels check the binding
/// themselves; a user channel is vouched for by its device's actor first.
async fn caller_for(
    channel: &Channel,
    fingerprint: CertFingerprint,
    state: &AppState,
) -> Result<Caller, Rejection> {
    if channel.is_device_channel() {
        return Ok(Caller::Certificate(fingerprint));
    }
    state
        .registry
        .call(&channel.device_id, Authorize(fingerprint))
        .await
        .map_err(Rejection::from_device)?;
    Ok(Caller::VouchedByDevice)
}

async fn checkin(
    req: &HttpRequest,
    body: &[u8],
    state: &AppState,
) -> Result<HttpResponse, Rejection> {
    let started = Instant::now();
    let fingerprint = device_identity(req, body, state)?;
    let checkin = decode_checkin(body).map_err(Rejection::protocol)?;
    let message_type = checkin.message.message_type();
    let span = tracing::info_span!("checkin", enrollment_id = %checkin.channel.id, message_type);
    let _entered = span.enter();
    let caller = caller_for(&checkin.channel, fingerprint, state).await?;
    let id = checkin.channel.id.clone();
    let reply = state
        .registry
        .call(&id, HandleCheckin { checkin, caller })
        .await
        .map_err(Rejection::from_device)?;
    metrics::counter!("orchard_checkin_messages_total", "message_type" => message_type)
        .increment(1);
    metrics::histogram!("orchard_checkin_duration_seconds", "message_type" => message_type)
        .record(started.elapsed().as_secs_f64());
    tracing::debug!("check-in handled");
    Ok(match reply {
        CheckinReply::Accepted => HttpResponse::Ok().finish(),
        CheckinReply::Plist(plist) => HttpResponse::Ok()
            .content_type("application/xml")
            .body(plist),
        CheckinReply::Json(json) => HttpResponse::Ok()
            .content_type("application/json")
            .body(json),
    })
}

async fn connect(
    req: &HttpRequest,
    body: web::Bytes,
    state: &AppState,
) -> Result<HttpResponse, Rejection> {
    let started = Instant::now();
    let fingerprint = device_identity(req, &body, state)?;
    let report = match decode_connect(&body) {
        Ok(report) => report,
        Err(e) => {
            note_unparseable_result(fingerprint, state).await;
            return Err(Rejection::protocol(e));
        }
    };
    let status = report.status.as_str();
    let caller = caller_for(&report.channel, fingerprint, state).await?;
    let id = report.channel.id.clone();
    let command_uuid = report.command_uuid.clone().unwrap_or_default();
    let next = state
        .registry
        .call(
            &id,
            HandleConnect {
                report,
                raw: Arc::from(&body[..]),
                caller,
            },
        )
        .await
        .map_err(Rejection::from_device)?;
    metrics::counter!("orchard_connect_reports_total", "status" => status).increment(1);
    metrics::histogram!("orchard_connect_duration_seconds", "status" => status)
        .record(started.elapsed().as_secs_f64());
    tracing::debug!(enrollment_id = %id, status, command_uuid = %command_uuid, "connect handled");
    Ok(match next {
        Some(command) => HttpResponse::Ok()
            .content_type("application/xml")
            .body(command.body.clone()),
        None => HttpResponse::Ok().finish(),
    })
}

/// A result the server cannot parse must not block the device's queue forever: charge it
/// to the command in flight for the enrollment this certificate is bound to.
async fn note_unparseable_result(fingerprint: CertFingerprint, state: &AppState) {
    if let Ok(Some(enrollment_id)) = state.store.cert_binding(&fingerprint).await {
        let _ = state.registry.send(&enrollment_id, UnparseableResult).await;
    }
}

/// `GET /mdm/enroll`: a fresh enrollment profile with its own identity.
pub async fn enroll(state: web::Data<AppState>) -> Result<HttpResponse, Rejection> {
    let profile = state
        .profiles
        .build(&*state.store)
        .await
        .map_err(Rejection::enrollment)?;
    metrics::counter!("orchard_enrollment_profiles_issued_total").increment(1);
    Ok(HttpResponse::Ok()
        .content_type("application/x-apple-aspen-config")
        .insert_header((
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"orchard-enroll.mobileconfig\"",
        ))
        .body(profile))
}
