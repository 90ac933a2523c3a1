//! The DDM admin API: KMFDDM/NanoHUB-compatible catalog, set and status routes under
//! `/api/v1/ddm` (contract.md §3.1; writes answer 204 when something changed, 304 when
//! nothing did), Orchard's bulk assignment and fleet views, and the sync doctor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::body::read_body;
use super::nanohub::rfc3339;
use super::rejection::Rejection;
use super::AppState;
use crate::commands;
use crate::ddm::catalog::{CatalogError, Change};
use crate::ddm::doctor::{diagnose, EnrollmentFacts, Finding};
use crate::ddm::fleet::minute_floor;
use crate::ddm::sync::DdmState;
use crate::ddm::{Issue, Validity};
use crate::device::messages::{DdmView, GetDdmView};
use crate::device::tally::FleetTally;
use crate::device::DeviceError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    let resource = |path: &str| web::resource(format!("/ddm{path}"));
    cfg.service(
        resource("/declarations")
            .get(list_declarations)
            .put(put_declaration),
    )
    .service(
        resource("/declarations/{id}")
            .get(get_declaration)
            .delete(delete_declaration),
    )
    .service(resource("/declarations/{id}/touch").post(touch_declaration))
    .service(resource("/sets").get(list_sets))
    .service(
        resource("/set-declarations/{set}")
            .get(set_declarations)
            .put(add_to_set)
            .delete(remove_from_set),
    )
    .service(resource("/declaration-sets/{id}").get(declaration_sets))
    .service(
        resource("/enrollment-sets/{enrollment}")
            .get(enrollment_sets)
            .put(assign_set)
            .delete(unassign_set),
    )
    .service(resource("/declaration-status/{enrollment}").get(declaration_status))
    .service(resource("/status-errors/{enrollment}").get(status_errors))
    .service(resource("/status-values/{enrollment}").get(status_values))
    .service(resource("/notify").post(notify))
    .service(resource("/tokens").get(mounted_tokens))
    .service(resource("/declaration-items").get(mounted_items))
    .service(resource("/declaration/{category}/{id}").get(mounted_declaration))
    .service(resource("/assignments").post(bulk_assign))
    .service(resource("/fleet/declarations").get(fleet_declarations))
    .service(resource("/diagnosis").get(fleet_diagnosis))
    .service(web::resource("/devices/{id}/ddm/diagnosis").get(device_diagnosis))
    .service(web::resource("/devices/{id}/ddm/reports").get(device_reports));
}

#[derive(Deserialize)]
struct NotifyFlag {
    nonotify: Option<String>,
}

impl NotifyFlag {
    fn notify(&self) -> bool {
        self.nonotify.is_none()
    }
}

fn catalog_error(e: CatalogError) -> Rejection {
    let status = match &e {
        CatalogError::Invalid(_) | CatalogError::MissingReference { .. } => StatusCode::BAD_REQUEST,
        CatalogError::InUse(..) => StatusCode::CONFLICT,
        CatalogError::UnknownDeclaration(_) | CatalogError::UnknownSet(_) => StatusCode::NOT_FOUND,
        CatalogError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    Rejection::api(status, e.reason(), e.to_string())
}

fn device_error(e: DeviceError) -> Rejection {
    let status = match e {
        DeviceError::UnknownEnrollment(_) => StatusCode::NOT_FOUND,
        _ => Rejection::from_device(e.clone()).status,
    };
    Rejection::api(status, e.reason(), e.to_string())
}

fn issues_json(issues: &[Issue]) -> Value {
    issues
        .iter()
        .map(|i| json!({ "severity": format!("{:?}", i.severity).to_lowercase(), "rule": i.rule, "path": i.path, "message": i.message }))
        .collect()
}

/// 204 when something changed (sync the affected enrollments unless `nonotify`), else 304.
async fn changed_response(state: &AppState, change: Change, notify: bool) -> HttpResponse {
    let mut response = if change.changed {
        HttpResponse::NoContent()
    } else {
        HttpResponse::NotModified()
    };
    if !change.warnings.is_empty() {
        response.insert_header((
            "X-Orchard-Warnings",
            issues_json(&change.warnings).to_string(),
        ));
    }
    if change.changed && notify && !change.affected_sets.is_empty() {
        let registry = Arc::clone(&state.registry);
        let store = Arc::clone(&state.store);
        let push = Arc::clone(&state.push);
        actix_web::rt::spawn(async move {
            match commands::set_members(&*store, &change.affected_sets).await {
                Ok(members) => {
                    if let Err(e) = commands::sync_declarations(&registry, &*push, &members).await {
                        tracing::error!(error = %e, "could not queue the DDM sync");
                    }
                }
                Err(e) => tracing::error!(error = %e, "could not list the enrollments to sync"),
            }
        });
    }
    response.finish()
}

async fn list_declarations(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.registry.catalog().declaration_ids())
}

/// `PUT /api/v1/ddm/declarations`: publish a declaration (validated before anything is stored).
async fn put_declaration(
    req: HttpRequest,
    payload: web::Payload,
    flag: web::Query<NotifyFlag>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let body = read_body(&req, payload, &state.settings)
        .await
        .map_err(Rejection::for_api)?;
    match state.registry.catalog().put_declaration(&body).await {
        Ok(change) => Ok(changed_response(&state, change, flag.notify()).await),
        Err(CatalogError::Invalid(crate::ddm::DdmError::Invalid { identifier, issues })) => {
            metrics::counter!("orchard_rejected_requests_total", "reason" => "invalid_declaration")
                .increment(1);
            tracing::warn!(identifier = ?identifier, "declaration rejected");
            Ok(HttpResponse::BadRequest().json(json!({
                "error": "invalid_declaration",
                "detail": format!("declaration {} is invalid", identifier.as_deref().unwrap_or("(without Identifier)")),
                "declaration": identifier,
                "issues": issues_json(&issues),
            })))
        }
        Err(e) => Err(catalog_error(e)),
    }
}

async fn get_declaration(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let declaration = state
        .registry
        .catalog()
        .declaration(&id)
        .ok_or_else(|| catalog_error(CatalogError::UnknownDeclaration(id.to_string())))?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(declaration.to_device_json()))
}

async fn delete_declaration(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    match state.registry.catalog().delete_declaration(&id).await {
        Ok(true) => Ok(HttpResponse::NoContent().finish()),
        Ok(false) => Err(catalog_error(CatalogError::UnknownDeclaration(
            id.to_string(),
        ))),
        Err(e) => Err(catalog_error(e)),
    }
}

async fn touch_declaration(
    id: web::Path<String>,
    flag: web::Query<NotifyFlag>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let change = state
        .registry
        .catalog()
        .touch(&id)
        .await
        .map_err(catalog_error)?;
    Ok(changed_response(&state, change, flag.notify()).await)
}

async fn list_sets(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.registry.catalog().set_names())
}

async fn set_declarations(set: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(
        state
            .registry
            .catalog()
            .set_declarations(&set)
            .unwrap_or_default(),
    )
}

#[derive(Deserialize)]
struct DeclarationQuery {
    declaration: String,
    nonotify: Option<String>,
}

async fn change_set_membership(
    set: &str,
    query: &DeclarationQuery,
    state: &AppState,
    add: bool,
) -> Result<HttpResponse, Rejection> {
    let change = state
        .registry
        .catalog()
        .change_set(set, &query.declaration, add)
        .await
        .map_err(catalog_error)?;
    Ok(changed_response(state, change, query.nonotify.is_none()).await)
}

async fn add_to_set(
    set: web::Path<String>,
    query: web::Query<DeclarationQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    change_set_membership(&set, &query, &state, true).await
}

async fn remove_from_set(
    set: web::Path<String>,
    query: web::Query<DeclarationQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    change_set_membership(&set, &query, &state, false).await
}

async fn declaration_sets(id: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.registry.catalog().sets_containing(&id))
}

async fn ddm_view(state: &AppState, enrollment: &str) -> Result<DdmView, Rejection> {
    state
        .registry
        .call_anywhere(enrollment, GetDdmView)
        .await
        .map_err(device_error)
}

async fn enrollment_sets(
    enrollment: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let view = ddm_view(&state, &enrollment).await?;
    Ok(HttpResponse::Ok().json(view.state.sets))
}

#[derive(Deserialize)]
struct SetQuery {
    set: String,
    nonotify: Option<String>,
}

async fn change_assignment(
    state: &AppState,
    enrollment: &str,
    query: &SetQuery,
    assign: bool,
) -> Result<HttpResponse, Rejection> {
    let ids = [enrollment.to_string()];
    let sync = query.nonotify.is_none();
    let mut outcome = commands::assign_set(
        &state.registry,
        &*state.push,
        &ids,
        &query.set,
        assign,
        sync,
    )
    .await
    .map_err(Rejection::store_failure)?;
    match outcome.pop().map(|(_, changed)| changed) {
        Some(Ok(true)) => Ok(HttpResponse::NoContent().finish()),
        Some(Ok(false)) => Ok(HttpResponse::NotModified().finish()),
        Some(Err(e)) => Err(device_error(e)),
        None => Err(device_error(DeviceError::Unavailable)),
    }
}

async fn assign_set(
    enrollment: web::Path<String>,
    query: web::Query<SetQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    change_assignment(&state, &enrollment, &query, true).await
}

async fn unassign_set(
    enrollment: web::Path<String>,
    query: web::Query<SetQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    change_assignment(&state, &enrollment, &query, false).await
}

/// KMFDDM's per-declaration status, with `current` = the reported token is the one served now.
async fn declaration_status(
    enrollment: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let view = ddm_view(&state, &enrollment).await?;
    let snapshot = state.registry.catalog().manifest(&view.state.sets);
    let received = view.state.status.last_report_at.map(rfc3339);
    let rows: Vec<Value> = view
        .state
        .status
        .declarations
        .values()
        .map(|d| {
            let current = snapshot
                .manifest
                .item(d.category, &d.identifier)
                .is_some_and(|item| item.server_token == d.server_token);
            json!({
                "identifier": d.identifier,
                "active": d.active,
                "valid": d.valid,
                "server-token": d.server_token,
                "ManifestType": d.category.status_key(),
                "current": current,
                "reasons": d.reasons.iter().map(|r| json!({"code": r.code, "description": r.description, "details": r.details})).collect::<Vec<_>>(),
                "status_received": received,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ enrollment.as_str(): rows })))
}

/// Declaration errors and status-item errors; `{}` when there are none (as KMFDDM).
async fn status_errors(
    enrollment: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let view = ddm_view(&state, &enrollment).await?;
    let received = view.state.status.last_report_at.map(rfc3339);
    let mut rows: Vec<Value> = view
        .state
        .status
        .declarations
        .values()
        .filter(|d| !d.active && d.valid != Validity::Valid || d.reasons.iter().any(|r| r.code.starts_with("Error.")))
        .map(|d| json!({ "path": format!("declaration:{}", d.identifier), "error": d.reasons.iter().map(|r| json!({"code": r.code, "description": r.description, "details": r.details})).collect::<Vec<_>>(), "timestamp": received }))
        .collect();
    rows.extend(view.state.status.errors.iter().map(|e| {
        json!({ "path": e.status_item, "error": e.reasons.iter().map(|r| json!({"code": r.code, "description": r.description, "details": r.details})).collect::<Vec<_>>(), "timestamp": received })
    }));
    if rows.is_empty() {
        return Ok(HttpResponse::Ok().json(json!({})));
    }
    Ok(HttpResponse::Ok().json(json!({ enrollment.as_str(): rows })))
}

#[derive(Deserialize)]
struct PrefixQuery {
    prefix: Option<String>,
}

/// Flattened status values as `.StatusItems.<path>` rows, optionally filtered by prefix.
async fn status_values(
    enrollment: web::Path<String>,
    query: web::Query<PrefixQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let view = ddm_view(&state, &enrollment).await?;
    let received = view.state.status.last_report_at.map(rfc3339);
    let rows: Vec<Value> = view
        .state
        .status
        .values
        .iter()
        .map(|(path, value)| (format!(".StatusItems.{path}"), value))
        .filter(|(path, _)| query.prefix.as_deref().is_none_or(|p| path.starts_with(p)))
        .map(|(path, value)| json!({ "path": path, "value": value, "timestamp": received }))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ enrollment.as_str(): rows })))
}

/// `POST /api/v1/ddm/notify?id=&set=&declaration=`: force a sync of the targets.
async fn notify(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Rejection> {
    let pairs: Vec<(String, String)> =
        web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .map(|q| q.into_inner())
            .unwrap_or_default();
    let mut ids: BTreeSet<String> = pairs
        .iter()
        .filter(|(k, _)| k == "id")
        .map(|(_, v)| v.clone())
        .collect();
    let mut sets: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "set")
        .map(|(_, v)| v.clone())
        .collect();
    for (_, declaration) in pairs.iter().filter(|(k, _)| k == "declaration") {
        sets.extend(state.registry.catalog().sets_containing(declaration));
    }
    ids.extend(
        commands::set_members(&*state.store, &sets)
            .await
            .map_err(Rejection::store_failure)?,
    );
    if ids.is_empty() {
        return Err(Rejection::api(
            StatusCode::BAD_REQUEST,
            "no_targets",
            "give id=, set= or declaration=",
        ));
    }
    let ids: Vec<String> = ids.into_iter().collect();
    commands::sync_declarations(&state.registry, &*state.push, &ids)
        .await
        .map_err(Rejection::store_failure)?;
    Ok(HttpResponse::NoContent().finish())
}

/// The enrollment named by `X-Enrollment-ID`, for the read-only mirrors of the device
/// endpoints (NanoHUB's debugging routes).
async fn mounted_view(req: &HttpRequest, state: &AppState) -> Result<(String, DdmView), Rejection> {
    let id = req
        .headers()
        .get("X-Enrollment-ID")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Rejection::api(
                StatusCode::BAD_REQUEST,
                "missing_enrollment_id",
                "send the enrollment in X-Enrollment-ID",
            )
        })?
        .to_string();
    let view = ddm_view(state, &id).await?;
    Ok((id, view))
}

/// What the device would get from `tokens` now (does not touch its sync state).
async fn mounted_tokens(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let (_, view) = mounted_view(&req, &state).await?;
    let snapshot = state.registry.catalog().manifest(&view.state.sets);
    Ok(HttpResponse::Ok().content_type("application/json").body(
        snapshot
            .manifest
            .tokens_json(time::OffsetDateTime::now_utc()),
    ))
}

async fn mounted_items(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let (_, view) = mounted_view(&req, &state).await?;
    let snapshot = state.registry.catalog().manifest(&view.state.sets);
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(snapshot.manifest.items_json()))
}

async fn mounted_declaration(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let (_, view) = mounted_view(&req, &state).await?;
    let (category, id) = path.into_inner();
    let snapshot = state.registry.catalog().manifest(&view.state.sets);
    crate::ddm::Category::parse(&category)
        .and_then(|c| snapshot.body(c, &id))
        .map(|d| {
            HttpResponse::Ok()
                .content_type("application/json")
                .body(d.to_device_json())
        })
        .ok_or_else(|| device_error(DeviceError::DeclarationNotFound(id)))
}

/// `{"set": "...", "enrollments": [...], "unassign": false, "no_sync": false}`.
#[derive(Deserialize)]
struct BulkAssignment {
    set: String,
    enrollments: Vec<String>,
    #[serde(default)]
    unassign: bool,
    #[serde(default)]
    no_sync: bool,
}

/// `POST /api/v1/ddm/assignments`: assign (or unassign) a set to many enrollments.
async fn bulk_assign(
    request: web::Json<BulkAssignment>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let results = commands::assign_set(
        &state.registry,
        &*state.push,
        &request.enrollments,
        &request.set,
        !request.unassign,
        !request.no_sync,
    )
    .await
    .map_err(Rejection::store_failure)?;
    let changed = results
        .iter()
        .filter(|(_, r)| matches!(r, Ok(true)))
        .count();
    let failed: BTreeMap<&String, String> = results
        .iter()
        .filter_map(|(id, r)| r.as_ref().err().map(|e| (id, e.to_string())))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "changed": changed,
        "unchanged": results.len() - changed - failed.len(),
        "failed": failed,
    })))
}

/// How long a fleet route waits for the fleet tally's startup walk before answering 503.
const TALLY_PATIENCE: Duration = Duration::from_secs(5);

/// Wait for the fleet tally, or refuse with 503 and the walk's progress.
async fn ready_tally(state: &AppState) -> Result<&FleetTally, Rejection> {
    let tally = state.registry.tally();
    match tally.wait_ready(TALLY_PATIENCE).await {
        Ok(()) => Ok(tally),
        Err(walked) => Err(Rejection::api(
            StatusCode::SERVICE_UNAVAILABLE,
            "fleet_tally_warming",
            format!("the fleet tally is still being rebuilt after startup ({walked} enrollments read); retry shortly"),
        )),
    }
}

/// `GET /api/v1/ddm/fleet/declarations`: per declaration, how many enrollments have it
/// active, invalid, pending (assigned, not reported at its current token) or on an old
/// token. Answered from the fleet tally against the current manifests.
async fn fleet_declarations(state: web::Data<AppState>) -> Result<HttpResponse, Rejection> {
    let tally = ready_tally(&state).await?;
    let catalog = Arc::clone(state.registry.catalog());
    let fleet = tally.declarations(&|sets| catalog.manifest(sets));
    Ok(HttpResponse::Ok().json(fleet))
}

fn findings_for(state: &AppState, ddm: &DdmState, facts: &EnrollmentFacts) -> Vec<Finding> {
    let snapshot = state.registry.catalog().manifest(&ddm.sets);
    diagnose(
        ddm,
        &snapshot,
        facts,
        crate::device::now_secs(),
        state.registry.settings().ddm_stall_after_secs,
    )
}

/// `GET /api/v1/devices/{id}/ddm/diagnosis`: the sync doctor's findings for one enrollment.
async fn device_diagnosis(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let view = ddm_view(&state, &id).await?;
    let findings = findings_for(&state, &view.state, &view.facts);
    for finding in &findings {
        metrics::counter!("orchard_ddm_findings_total", "rule" => finding.rule).increment(1);
    }
    Ok(HttpResponse::Ok().json(json!({
        "enrollment_id": id.as_str(),
        "findings": findings,
        "timeline": view.state.timeline,
    })))
}

/// `GET /api/v1/devices/{id}/ddm/reports`: the last status reports exactly as the device
/// sent them (an unparseable one as a string), oldest first.
async fn device_reports(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let known = state
        .store
        .enrollment(&id)
        .await
        .map_err(Rejection::store_failure)?;
    if known.is_none() {
        return Err(device_error(DeviceError::UnknownEnrollment(id.to_string())));
    }
    let reports = state
        .store
        .ddm_reports(&id)
        .await
        .map_err(Rejection::store_failure)?;
    let reports: Vec<Value> = reports
        .into_iter()
        .map(|report| {
            let body =
                serde_json::from_str::<Value>(&report.json).unwrap_or(Value::String(report.json));
            json!({ "received_at": rfc3339(report.received_at), "report": body })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "enrollment_id": id.as_str(),
        "reports": reports,
    })))
}

/// `GET /api/v1/ddm/diagnosis`: enrollments per doctor rule across the fleet, as of the
/// start of the current minute (stall deadlines are tallied to the minute).
async fn fleet_diagnosis(state: web::Data<AppState>) -> Result<HttpResponse, Rejection> {
    let tally = ready_tally(&state).await?;
    let catalog = Arc::clone(state.registry.catalog());
    let as_of = minute_floor(crate::device::now_secs());
    let (per_rule, enrollments) = tally.findings(&|sets| catalog.manifest(sets), as_of);
    Ok(HttpResponse::Ok().json(json!({
        "rules": per_rule,
        "enrollments": enrollments,
        "as_of": rfc3339(as_of),
    })))
}
