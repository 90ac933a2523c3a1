//! Node-to-node HTTP in a cluster: device requests passed on to the owner of their shard,
//! and the `/internal/` routes the peers call.
//!
//! The node a device reaches verifies its identity (TLS, proxy header or
//! `Mdm-Signature`) and sends the owner the body with the verified certificate
//! fingerprint; the owner trusts that fingerprint only because the request carries the
//! cluster secret's signature over it (`forward/signature.rs`), and checks it against the
//! enrollment's binding as for any device. An owner that no longer serves the shard
//! answers 421, and the sender routes the request once more from the shard's row read
//! then; failing that, the device gets 503 with Retry-After and retries.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use super::body::read_limited;
use super::device::{self, DeviceEndpoint, Hop};
use super::rejection::Rejection;
use super::AppState;
use crate::cluster::{Route, ShardId};
use crate::commands;
use crate::device::tally::{this_nodes_part, FleetView};
use crate::device::{answer_batch, BatchError, DeviceError};
use crate::forward::{Forwarder, Outgoing, Signed, FINGERPRINT_HEADER, SIGNATURE_HEADER};
use crate::identity::CertFingerprint;
use crate::push::PushTarget;

/// The largest body a peer may send: a batch of 2,000 ids and one command body.
const PEER_BODY_LIMIT: usize = 64 << 20;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/internal")
            .route("/device/checkin", web::put().to(device_checkin))
            .route("/device/connect", web::put().to(device_connect))
            .route("/actors/{kind}", web::post().to(actors))
            .route("/push", web::post().to(push))
            .route("/fleet", web::post().to(fleet_part))
            .default_service(web::to(unknown_route)),
    );
}

/// A verified device request on its way to the owner.
pub struct ForwardedDevice {
    pub endpoint: DeviceEndpoint,
    pub fingerprint: CertFingerprint,
    pub body: web::Bytes,
}

impl ForwardedDevice {
    fn path(&self) -> &'static str {
        match self.endpoint {
            DeviceEndpoint::Checkin => "/internal/device/checkin",
            DeviceEndpoint::Connect => "/internal/device/connect",
        }
    }

    fn content_type(&self) -> &'static str {
        match self.endpoint {
            DeviceEndpoint::Checkin => device::CHECKIN_CONTENT_TYPE,
            DeviceEndpoint::Connect => "application/xml",
        }
    }
}

/// Pass a device request to the node at `url`, and once more to the shard's owner as read
/// now if that node refused it or could not be reached. `None`: the fresh read says this
/// node serves the shard after all.
pub async fn forward_device(
    forwarder: &Forwarder,
    url: &str,
    shard: ShardId,
    request: ForwardedDevice,
) -> Result<Option<HttpResponse>, Rejection> {
    if let Some(answer) = send_device(forwarder, url, &request).await {
        return Ok(Some(answer));
    }
    match forwarder.node().reroute(shard).await {
        Route::Local => Ok(None),
        Route::Peer { url, .. } => match send_device(forwarder, &url, &request).await {
            Some(answer) => Ok(Some(answer)),
            None => Err(moving()),
        },
        Route::Unavailable => Err(moving()),
    }
}

/// The owner's answer, relayed as is; `None` when it refused the shard or did not answer.
async fn send_device(
    forwarder: &Forwarder,
    url: &str,
    request: &ForwardedDevice,
) -> Option<HttpResponse> {
    let outgoing = Outgoing {
        method: http::Method::PUT,
        path_and_query: request.path(),
        fingerprint: Some(&request.fingerprint),
        content_type: Some(request.content_type()),
        body: request.body.clone(),
        route: match request.endpoint {
            DeviceEndpoint::Checkin => "device_checkin",
            DeviceEndpoint::Connect => "device_connect",
        },
    };
    let response = forwarder.send(url, outgoing).await.ok()?;
    if response.status == StatusCode::MISDIRECTED_REQUEST.as_u16() {
        return None;
    }
    let status = StatusCode::from_u16(response.status).ok()?;
    let mut answer = HttpResponse::build(status);
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(value) = response.header(name.as_str()) {
            answer.insert_header((name, value.to_string()));
        }
    }
    Some(answer.body(response.body))
}

/// A shard between owners: the device retries after Retry-After.
fn moving() -> Rejection {
    Rejection::from_device(DeviceError::NotLocal)
}

/// 421 from an owner that no longer serves the device: the sender routes again.
pub fn not_owner(id: &str) -> Rejection {
    Rejection::device(
        StatusCode::MISDIRECTED_REQUEST,
        "not_owner",
        format!("this node does not serve enrollment {id} now"),
    )
}

/// Check the cluster signature; answers the device identity the sender vouched for.
fn verify_peer(
    req: &HttpRequest,
    body: &[u8],
    state: &AppState,
) -> Result<Option<CertFingerprint>, Rejection> {
    let refuse = |reason: &'static str, detail: &str| {
        Rejection::api(StatusCode::FORBIDDEN, reason, detail.to_string())
    };
    let Some(forwarder) = &state.forwarder else {
        return Err(refuse(
            "not_a_cluster_node",
            "node-to-node routes answer only in cluster mode (--cluster-secret)",
        ));
    };
    let signature = req
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            refuse(
                "cluster_signature_missing",
                "node-to-node routes need the cluster secret's signature",
            )
        })?;
    let fingerprint = match req.headers().get(FINGERPRINT_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| hex::decode(v).ok())
                .and_then(|bytes| CertFingerprint::try_from(bytes).ok())
                .ok_or_else(|| {
                    refuse(
                        "cluster_signature_invalid",
                        "the vouched fingerprint is malformed",
                    )
                })?,
        ),
    };
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(req.path());
    let signed = Signed {
        method: req.method().as_str(),
        path_and_query,
        fingerprint: fingerprint.as_ref(),
        body,
    };
    if !forwarder.key().verify(signed, signature) {
        return Err(refuse(
            "cluster_signature_invalid",
            "the cluster signature does not match this request",
        ));
    }
    Ok(fingerprint)
}

/// The body of a peer's request, once its signature is checked; with the device
/// identity it vouches for. `route` labels the count of requests taken from peers.
async fn signed_body(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    route: &'static str,
) -> Result<(web::Bytes, Option<CertFingerprint>), Rejection> {
    let body = read_limited(req, payload, PEER_BODY_LIMIT, state.settings.body_timeout).await?;
    let fingerprint = verify_peer(req, &body, state)?;
    metrics::counter!("orchard_forwarded_requests_received_total", "route" => route).increment(1);
    Ok((body, fingerprint))
}

async fn device_request(
    endpoint: DeviceEndpoint,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let (body, fingerprint) = signed_body(&req, payload, &state, "device").await?;
    let fingerprint = fingerprint.ok_or_else(|| {
        Rejection::api(
            StatusCode::BAD_REQUEST,
            "missing_fingerprint",
            "a forwarded device request names the identity the sending node verified",
        )
    })?;
    device::serve(endpoint, fingerprint, body, &state, Hop::Owner).await
}

/// `PUT /internal/device/checkin`: a check-in a peer took from the device.
async fn device_checkin(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    device_request(DeviceEndpoint::Checkin, req, payload, state).await
}

/// `PUT /internal/device/connect`: a connect report a peer took from the device.
async fn device_connect(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    device_request(DeviceEndpoint::Connect, req, payload, state).await
}

/// `POST /internal/actors/{kind}`: one message for the actors of many devices here.
async fn actors(
    req: HttpRequest,
    kind: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let (body, _) = signed_body(&req, payload, &state, "actors").await?;
    match answer_batch(&state.registry, &kind, &body).await {
        Ok(answers) => Ok(HttpResponse::Ok()
            .content_type("application/json")
            .body(answers)),
        Err(e @ BatchError::UnknownKind(_)) => Err(Rejection::api(
            StatusCode::NOT_FOUND,
            "unknown_actor_message",
            e.to_string(),
        )),
        Err(e @ BatchError::Malformed(_)) => Err(Rejection::api(
            StatusCode::BAD_REQUEST,
            "malformed_batch",
            e.to_string(),
        )),
    }
}

/// `POST /internal/push`: push these targets, devices of this node, from this node.
async fn push(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let (body, _) = signed_body(&req, payload, &state, "push").await?;
    let targets: Vec<PushTarget> = serde_json::from_slice(&body).map_err(|e| {
        Rejection::api(
            StatusCode::BAD_REQUEST,
            "malformed_push_batch",
            e.to_string(),
        )
    })?;
    let outcomes = commands::push_here(&state.registry, &*state.push, &targets).await;
    Ok(HttpResponse::Ok().json(outcomes))
}

/// `POST /internal/fleet`: this node's part of a fleet view (the shards it counts).
async fn fleet_part(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let (body, _) = signed_body(&req, payload, &state, "fleet").await?;
    let view: FleetView = serde_json::from_slice(&body).map_err(|e| {
        Rejection::api(
            StatusCode::BAD_REQUEST,
            "malformed_fleet_view",
            e.to_string(),
        )
    })?;
    Ok(HttpResponse::Ok().json(this_nodes_part(&state.registry, view).await))
}

/// Any other `/internal/` path: refused without the signature, unknown with it.
async fn unknown_route(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    signed_body(&req, payload, &state, "unknown").await?;
    Err(Rejection::api(
        StatusCode::NOT_FOUND,
        "unknown_route",
        format!("no internal route {} {}", req.method(), req.path()),
    ))
}
