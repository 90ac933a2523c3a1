//! Device-facing endpoints: check-in, connect (command queue) and the enrollment profile.

use std::time::Instant;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use tracing::Instrument;

use super::body::read_body;
use super::identity::device_identity;
use super::internal::{self, ForwardedDevice};
use super::rejection::Rejection;
use super::AppState;
use crate::cluster::{shard_of, Route};
use crate::device::messages::{
    Authorize, BindImported, Caller, CheckinReply, HandleCheckin, HandleConnect, UnparseableResult,
};
use crate::device::{DeviceActor, DeviceError};
use crate::identity::CertFingerprint;
use crate::protocol::checkin::{decode_checkin, Checkin};
use crate::protocol::connect::{decode_connect, ConnectReport};
use crate::protocol::ids::Channel;

pub const CHECKIN_CONTENT_TYPE: &str = "application/x-apple-aspen-mdm-checkin";

fn content_type(req: &HttpRequest) -> &str {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Which device endpoint a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEndpoint {
    Checkin,
    Connect,
}

/// Whether this node took the request from the device (and may pass it on to the owner
/// of the device's shard) or from a peer that already did (and must not pass it on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    Edge,
    Owner,
}

/// `PUT /mdm`: a check-in if the Content-Type says so, otherwise a connect report.
pub async fn mdm(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let body = read_body(&req, payload, &state.settings).await?;
    let endpoint = match content_type(&req).starts_with(CHECKIN_CONTENT_TYPE) {
        true => DeviceEndpoint::Checkin,
        false => DeviceEndpoint::Connect,
    };
    let fingerprint = device_identity(&req, &body, &state)?;
    serve(endpoint, fingerprint, body, &state, Hop::Edge).await
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
    let fingerprint = device_identity(&req, &body, &state)?;
    serve(
        DeviceEndpoint::Checkin,
        fingerprint,
        body,
        &state,
        Hop::Edge,
    )
    .await
}

/// Answer a device request whose identity is verified: here when this node serves the
/// device's shard, else by its owner (`internal::forward_device`).
pub async fn serve(
    endpoint: DeviceEndpoint,
    fingerprint: CertFingerprint,
    body: web::Bytes,
    state: &AppState,
    hop: Hop,
) -> Result<HttpResponse, Rejection> {
    match endpoint {
        DeviceEndpoint::Checkin => {
            let checkin = decode_checkin(&body).map_err(Rejection::protocol)?;
            let id = checkin.channel.id.clone();
            match forward(state, &id, hop, endpoint, fingerprint, &body).await? {
                Some(answer) => Ok(answer),
                None => handle_checkin(checkin, body, fingerprint, state).await,
            }
        }
        DeviceEndpoint::Connect => match decode_connect(&body) {
            Ok(report) => {
                let id = report.channel.id.clone();
                match forward(state, &id, hop, endpoint, fingerprint, &body).await? {
                    Some(answer) => Ok(answer),
                    None => handle_connect(report, body, fingerprint, state).await,
                }
            }
            Err(e) => {
                if let Some(id) = bound_enrollment(fingerprint, state).await {
                    if let Some(answer) =
                        forward(state, &id, hop, endpoint, fingerprint, &body).await?
                    {
                        return Ok(answer);
                    }
                    let _ = state.registry.send(&id, UnparseableResult).await;
                }
                Err(Rejection::protocol(e))
            }
        },
    }
}

/// The owner's answer when another node serves `id` (`None`: serve it here).
async fn forward(
    state: &AppState,
    id: &str,
    hop: Hop,
    endpoint: DeviceEndpoint,
    fingerprint: CertFingerprint,
    body: &web::Bytes,
) -> Result<Option<HttpResponse>, Rejection> {
    let Some(forwarder) = &state.forwarder else {
        return Ok(None);
    };
    let shard = shard_of(id);
    // A shard just handed over shows no owner here until the next round: read its row.
    let route = match forwarder.node().route(shard) {
        Route::Unavailable => forwarder.node().reroute(shard).await,
        route => route,
    };
    match (route, hop) {
        (Route::Local, _) => Ok(None),
        (Route::Peer { url, .. }, Hop::Edge) => {
            let request = ForwardedDevice {
                endpoint,
                fingerprint,
                body: body.clone(),
            };
            internal::forward_device(forwarder, &url, shard, request).await
        }
        (Route::Peer { .. }, Hop::Owner) => Err(internal::not_owner(id)),
        (Route::Unavailable, _) => Err(Rejection::from_device(DeviceError::NotLocal)),
    }
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
    call_as_device(
        state,
        &channel.device_id,
        &channel.device_id,
        fingerprint,
        Authorize(fingerprint),
    )
    .await
    .map_err(Rejection::from_device)?;
    Ok(Caller::VouchedByDevice)
}

/// Send `msg` to the actor of `id` on behalf of the device whose channel is
/// `device_id`. When that device was imported through `/migration` and has no
/// certificate yet, `--retro` binds this one first and the message is sent again;
/// without `--retro` the device is refused (`ImportedUnbound`, saying so).
async fn call_as_device<M, T>(
    state: &AppState,
    id: &str,
    device_id: &str,
    fingerprint: CertFingerprint,
    msg: M,
) -> Result<T, DeviceError>
where
    M: actix::Message<Result = Result<T, DeviceError>> + Clone + Send + 'static,
    T: Send + 'static,
    DeviceActor: actix::Handler<M>,
{
    match state.registry.call(id, msg.clone()).await {
        Err(DeviceError::ImportedUnbound(_)) if state.registry.settings().retro => {
            state
                .registry
                .call::<BindImported, ()>(device_id, BindImported(fingerprint))
                .await?;
            state.registry.call(id, msg).await
        }
        answer => answer,
    }
}

async fn handle_checkin(
    checkin: Checkin,
    raw: web::Bytes,
    fingerprint: CertFingerprint,
    state: &AppState,
) -> Result<HttpResponse, Rejection> {
    let message_type = checkin.message.message_type();
    let span = tracing::info_span!("checkin", enrollment_id = %checkin.channel.id, message_type);
    // Instrumented, not entered: a guard held across an await would leave the span
    // entered on the worker thread for whatever request runs there next.
    checkin_in_span(checkin, raw, fingerprint, state, message_type)
        .instrument(span)
        .await
}

async fn checkin_in_span(
    checkin: Checkin,
    raw: web::Bytes,
    fingerprint: CertFingerprint,
    state: &AppState,
    message_type: &'static str,
) -> Result<HttpResponse, Rejection> {
    let started = Instant::now();
    let caller = caller_for(&checkin.channel, fingerprint, state).await?;
    let id = checkin.channel.id.clone();
    let device_id = checkin.channel.device_id.clone();
    let message = HandleCheckin {
        checkin,
        raw,
        caller,
    };
    let reply = call_as_device(state, &id, &device_id, fingerprint, message)
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

async fn handle_connect(
    report: ConnectReport,
    body: web::Bytes,
    fingerprint: CertFingerprint,
    state: &AppState,
) -> Result<HttpResponse, Rejection> {
    let started = Instant::now();
    let status = report.status.as_str();
    let caller = caller_for(&report.channel, fingerprint, state).await?;
    let id = report.channel.id.clone();
    let device_id = report.channel.device_id.clone();
    let command_uuid = report.command_uuid.clone().unwrap_or_default();
    let message = HandleConnect {
        report,
        raw: body,
        caller,
    };
    let next = call_as_device(state, &id, &device_id, fingerprint, message)
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

/// A result the server cannot parse must not block the device's queue forever: it is
/// charged to the command in flight for the enrollment this certificate is bound to.
async fn bound_enrollment(fingerprint: CertFingerprint, state: &AppState) -> Option<String> {
    state.store.cert_binding(&fingerprint).await.ok().flatten()
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
