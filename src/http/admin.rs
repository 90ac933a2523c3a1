//! Orchard's own admin routes (contract.md §3.2): device inventory, command history,
//! JSON enqueue from schema-validated templates, cancellation, and the OpenAPI document.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::endpoint::Endpoint;
use super::nanohub::rfc3339;
use super::rejection::Rejection;
use super::AppState;
use crate::commands::{self, Delivery};
use crate::device::messages::{Cancel, DeviceSnapshot, Snapshot};
use crate::device::DeviceError;
use crate::protocol::command::build_command;
use crate::schema;
use crate::store::{QueueEntry, StoredCommand};

const OPENAPI: &str = include_str!("openapi.json");

/// Orchard's own admin routes, relative to `/api/v1`.
pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new("/devices").get(list_devices),
        Endpoint::new("/devices/{id}").get(get_device),
        Endpoint::new("/cluster").get(cluster_status),
        Endpoint::new("/devices/{id}/commands")
            .get(device_commands)
            .post(enqueue_for_device),
        Endpoint::new("/devices/{id}/commands/{uuid}").delete(cancel_command),
        Endpoint::new("/commands").post(enqueue_bulk),
        Endpoint::new("/command-templates").get(templates),
    ]
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

fn api_error(e: DeviceError) -> Rejection {
    let status = match e {
        DeviceError::UnknownEnrollment(_) => StatusCode::NOT_FOUND,
        _ => Rejection::from_device(e.clone()).status,
    };
    Rejection::api(status, e.reason(), e.to_string())
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// Enrollment ids per page unless `limit` says otherwise.
const DEFAULT_PAGE: usize = 1000;
/// The most a page may hold (the document's `limit` maximum).
const MAX_PAGE: usize = 10_000;

/// `limit` as the document states it: 1 to [`MAX_PAGE`]; anything else is refused rather
/// than silently clamped, so a client learns its page is not the size it asked for.
fn page_size(limit: Option<usize>) -> Result<usize, Rejection> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(limit @ 1..=MAX_PAGE) => Ok(limit),
        Some(limit) => Err(Rejection::api(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            format!("limit must be 1 to {MAX_PAGE}, not {limit}"),
        )),
    }
}

/// `GET /api/v1/devices?after=&limit=`: enrollment ids in order, paginated.
async fn list_devices(
    query: web::Query<ListQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let limit = page_size(query.limit)?;
    let ids = state
        .store
        .enrollment_ids(query.after.as_deref(), limit)
        .await
        .map_err(Rejection::store_failure)?;
    let next = (ids.len() == limit).then(|| ids.last().cloned()).flatten();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "devices": ids, "next": next })))
}

async fn snapshot(state: &AppState, id: &str) -> Result<DeviceSnapshot, Rejection> {
    state
        .registry
        .call_anywhere(id, Snapshot)
        .await
        .map_err(api_error)
}

/// `GET /api/v1/devices/{id}`.
async fn get_device(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let DeviceSnapshot { record, pending } = snapshot(&state, &id).await?;
    let device_info: BTreeMap<_, _> = record.device_info.iter().cloned().collect();
    let mut view = serde_json::json!({
        "id": record.id,
        "device_id": record.device_id,
        "kind": record.kind.as_str(),
        "enabled": record.enabled,
        "topic": record.topic,
        "last_seen": rfc3339(record.last_seen),
        "enrolled_at": rfc3339(record.enrolled_at),
        "push_token_valid": record.push_token_valid && record.push.is_some(),
        "awaiting_configuration": record.awaiting_configuration,
        "token_update_count": record.token_update_count,
        "has_bootstrap_token": record.bootstrap_token.is_some(),
        "has_unlock_token": record.unlock_token.is_some(),
        "enrollment_generation": record.generation,
        "user_channels": record.user_channels,
        "pending_commands": pending.len(),
        "device_info": device_info,
    });
    if record.id == record.device_id {
        // False only for an enrollment imported through /migration that has not yet
        // presented its identity certificate (it binds the first one with --retro).
        view["identity_bound"] = record.cert_fingerprint.is_some().into();
    }
    if let Some(cluster) = &state.cluster {
        let shard = crate::cluster::shard_of(&record.id);
        view["shard"] = shard.0.into();
        view["owner"] = cluster.owner(shard).map(|(node, _)| node).into();
    }
    Ok(HttpResponse::Ok().json(view))
}

/// `GET /api/v1/cluster`: every node this node knows of, alive or not, with the shards
/// it holds (contract §4); 404 outside cluster mode.
async fn cluster_status(state: web::Data<AppState>) -> Result<HttpResponse, Rejection> {
    let Some(cluster) = &state.cluster else {
        return Err(Rejection::api(
            StatusCode::NOT_FOUND,
            "not_a_cluster",
            "this node runs without a cluster (--store scylla --cluster-secret)",
        ));
    };
    let (nodes, unowned) = cluster.status();
    let nodes: Vec<_> = nodes
        .into_iter()
        .map(|node| {
            serde_json::json!({
                "node_id": node.node_id,
                "advertise_url": node.advertise_url,
                "alive": node.alive,
                "shards": node.shards,
                "last_heartbeat": rfc3339(node.last_heartbeat_millis.div_euclid(1000)),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "node_id": cluster.node_id(),
        "nodes": nodes,
        "shards_total": crate::cluster::VIRTUAL_SHARDS,
        "shards_unowned": unowned,
    })))
}

#[derive(Serialize)]
struct CommandView {
    command_uuid: String,
    request_type: String,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_now_count: Option<u32>,
    #[serde(skip)]
    seq: u64,
}

fn pending_view(entry: &QueueEntry) -> CommandView {
    let status = if entry.parked {
        "parked"
    } else if entry.not_now_count > 0 {
        "NotNow"
    } else {
        "pending"
    };
    CommandView {
        command_uuid: entry.command_uuid.clone(),
        request_type: entry.request_type.clone(),
        status: status.to_string(),
        result: None,
        not_now_count: Some(entry.not_now_count),
        seq: entry.seq,
    }
}

/// `GET /api/v1/devices/{id}/commands`: pending commands and stored results, oldest first.
async fn device_commands(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let DeviceSnapshot { pending, .. } = snapshot(&state, &id).await?;
    let results = state
        .store
        .results(&id, 1000)
        .await
        .map_err(Rejection::store_failure)?;
    let mut views: Vec<CommandView> = pending.iter().map(pending_view).collect();
    for result in results {
        if pending
            .iter()
            .any(|p| p.command_uuid == result.command_uuid)
        {
            if let Some(view) = views
                .iter_mut()
                .find(|v| v.command_uuid == result.command_uuid)
            {
                view.result = Some(String::from_utf8_lossy(&result.raw).into_owned());
            }
            continue;
        }
        views.push(CommandView {
            command_uuid: result.command_uuid,
            request_type: result.request_type,
            status: result.status.as_str().to_string(),
            result: Some(String::from_utf8_lossy(&result.raw).into_owned()),
            not_now_count: None,
            seq: result.seq,
        });
    }
    views.sort_by_key(|v| v.seq);
    Ok(HttpResponse::Ok().json(views))
}

/// A command built from a template: `{"request_type", "params", "priority", "command_uuid", "no_push"}`.
#[derive(Deserialize)]
struct TemplateRequest {
    request_type: String,
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    priority: u8,
    command_uuid: Option<String>,
    #[serde(default)]
    no_push: bool,
}

#[derive(Deserialize)]
struct BulkTemplateRequest {
    targets: Vec<String>,
    #[serde(flatten)]
    command: TemplateRequest,
}

fn build_from_template(request: &TemplateRequest) -> Result<StoredCommand, Rejection> {
    let command = schema::build_command(&request.request_type, &request.params)
        .map_err(|e| Rejection::api(StatusCode::BAD_REQUEST, "invalid_command", e.to_string()))?;
    let command_uuid = match &request.command_uuid {
        Some(uuid) => {
            crate::protocol::ids::validate_identifier("command_uuid", uuid)
                .map_err(|e| Rejection::protocol(e).for_api())?;
            uuid.clone()
        }
        None => uuid::Uuid::new_v4().to_string().to_uppercase(),
    };
    Ok(StoredCommand {
        body: build_command(&command_uuid, command),
        command_uuid,
        request_type: request.request_type.clone(),
    })
}

async fn deliver(
    state: &AppState,
    ids: &[String],
    request: &TemplateRequest,
) -> Result<(StoredCommand, Vec<Delivery>), Rejection> {
    let command = build_from_template(request)?;
    let deliveries = commands::enqueue(
        &state.registry,
        &*state.store,
        &*state.push,
        ids,
        command.clone(),
        request.priority,
        !request.no_push,
    )
    .await
    .map_err(Rejection::store_failure)?;
    Ok((command, deliveries))
}

fn delivery_json(delivery: &Delivery) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    out.insert("queued".into(), delivery.queued.is_ok().into());
    if let Err(e) = &delivery.queued {
        out.insert("error".into(), e.to_string().into());
    }
    if let Some(push) = &delivery.push {
        out.insert("push_sent".into(), push.is_sent().into());
        out.insert("push".into(), push.to_nanohub_json());
    }
    out.into()
}

/// `POST /api/v1/devices/{id}/commands`: enqueue a template command for one enrollment.
async fn enqueue_for_device(
    id: web::Path<String>,
    request: web::Json<TemplateRequest>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let ids = [id.into_inner()];
    let (command, deliveries) = deliver(&state, &ids, &request).await?;
    let delivery = &deliveries[0];
    if let Err(e) = &delivery.queued {
        return Err(api_error(e.clone()));
    }
    let mut body = delivery_json(delivery);
    body["command_uuid"] = command.command_uuid.into();
    body["request_type"] = command.request_type.into();
    Ok(HttpResponse::Created().json(body))
}

/// `POST /api/v1/commands`: one template command for many enrollments (`targets`).
async fn enqueue_bulk(
    request: web::Json<BulkTemplateRequest>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    if request.targets.is_empty() {
        return Err(Rejection::api(
            StatusCode::BAD_REQUEST,
            "no_ids",
            "targets is empty",
        ));
    }
    let (command, deliveries) = deliver(&state, &request.targets, &request.command).await?;
    let results: serde_json::Map<String, serde_json::Value> = deliveries
        .iter()
        .map(|d| (d.enrollment_id.clone(), delivery_json(d)))
        .collect();
    let queued = deliveries.iter().filter(|d| d.queued.is_ok()).count();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "command_uuid": command.command_uuid,
        "request_type": command.request_type,
        "queued": queued,
        "failed": deliveries.len() - queued,
        "results": results,
    })))
}

/// `DELETE /api/v1/devices/{id}/commands/{uuid}`: cancel a command not yet answered.
async fn cancel_command(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let (id, command_uuid) = path.into_inner();
    let cancelled = state
        .registry
        .call_anywhere(
            &id,
            Cancel {
                command_uuid: command_uuid.clone(),
            },
        )
        .await
        .map_err(api_error)?;
    if cancelled {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(Rejection::api(
            StatusCode::NOT_FOUND,
            "not_pending",
            format!("command {command_uuid} is not pending for {id}"),
        ))
    }
}

/// `GET /api/v1/command-templates`: the RequestTypes the JSON enqueue routes accept.
async fn templates() -> HttpResponse {
    HttpResponse::Ok().json(schema::template_names())
}
