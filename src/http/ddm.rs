//! The DDM admin API: KMFDDM/NanoHUB-compatible catalog, set and status routes under
//! `/api/v1/ddm` (contract.md §3.1; writes answer 204 when something changed, 304 when
//! nothing did), Orchard's bulk assignment and fleet views, and the sync doctor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::body::read_body;
use super::endpoint::Endpoint;
use super::nanohub::{rfc3339, route_ids};
use super::rejection::Rejection;
use super::AppState;
use crate::commands;
use crate::ddm::catalog::{CatalogError, Change};
use crate::ddm::doctor::{diagnose, EnrollmentFacts, Finding};
use crate::ddm::fleet::minute_floor;
use crate::ddm::kmfddm::{self, PathPrefix};
use crate::ddm::sync::DdmState;
use crate::ddm::Issue;
use crate::device::messages::{DdmView, GetDdmView};
use crate::device::tally::{fleet_view, FleetShare, FleetView};
use crate::device::DeviceError;
use crate::store::StoredReport;

/// The DDM routes, relative to `/api/v1`.
pub(super) fn endpoints() -> Vec<Endpoint> {
    let ddm = |path: &str| Endpoint::new(format!("/ddm{path}"));
    vec![
        ddm("/declarations")
            .get(list_declarations)
            .put(put_declaration),
        ddm("/declarations/{id}")
            .get(get_declaration)
            .delete(delete_declaration),
        ddm("/declarations/{id}/touch").post(touch_declaration),
        ddm("/sets").get(list_sets),
        ddm("/set-declarations/{set}")
            .get(set_declarations)
            .put(add_to_set)
            .delete(remove_from_set),
        ddm("/enrollment-sets-all/{enrollment}").delete(unassign_all_sets),
        ddm("/enrollment-sets-all/sets/{enrollment}").delete(unassign_all_sets),
        ddm("/declaration-sets/{id}").get(declaration_sets),
        ddm("/enrollment-sets/{enrollment}")
            .get(enrollment_sets)
            .put(assign_set)
            .delete(unassign_set),
        ddm("/declaration-status/{enrollment}").get(declaration_status),
        ddm("/status-errors/{enrollment}").get(status_errors),
        ddm("/status-values/{enrollment}").get(status_values),
        ddm("/status-report/{enrollment}").get(status_report),
        ddm("/notify").post(notify),
        ddm("/tokens").get(mounted_tokens),
        ddm("/declaration-items").get(mounted_items),
        ddm("/declaration/{category}/{id}").get(mounted_declaration),
        ddm("/assignments").post(bulk_assign),
        ddm("/fleet/declarations").get(fleet_declarations),
        ddm("/diagnosis").get(fleet_diagnosis),
        Endpoint::new("/devices/{id}/ddm/diagnosis").get(device_diagnosis),
        Endpoint::new("/devices/{id}/ddm/reports").get(device_reports),
    ]
}

#[derive(Deserialize)]
struct NotifyFlag {
    nonotify: Option<String>,
}

impl NotifyFlag {
    fn notify(&self) -> bool {
        notify_wanted(self.nonotify.as_deref())
    }
}

/// Whether a write should sync the enrollments it affects, from its `nonotify` query
/// parameter: KMFDDM's booleans (`nonotify=1`, `true`, … skip the sync; `0`, `false`,
/// `no`, `off` do not), and a bare `?nonotify` skips it too.
fn notify_wanted(nonotify: Option<&str>) -> bool {
    match nonotify.map(str::to_ascii_lowercase).as_deref() {
        None | Some("0" | "false" | "no" | "off") => true,
        Some(_) => false,
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
        sync_members_of(state, &change.affected_sets).await;
    }
    response.finish()
}

/// Sync the enrollments that are members of `sets` when the change is answered. The
/// members are read before the answer, so an enrollment assigned by a later request
/// (say with `nonotify`) is not synced for this change; the syncs themselves are queued
/// in the background, as a large set takes a while to wake.
async fn sync_members_of(state: &AppState, sets: &[String]) {
    let members = match commands::set_members(&*state.store, sets).await {
        Ok(members) => members,
        Err(e) => {
            tracing::error!(error = %e, "could not list the enrollments to sync");
            return;
        }
    };
    let registry = Arc::clone(&state.registry);
    let push = Arc::clone(&state.push);
    actix_web::rt::spawn(async move {
        if let Err(e) = commands::sync_declarations(&registry, &*push, &members).await {
            tracing::error!(error = %e, "could not queue the DDM sync");
        }
    });
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

/// `DELETE /api/v1/ddm/declarations/{id}`: 204 when deleted, 304 when there was none,
/// 409 while a set still holds it.
async fn delete_declaration(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    match state.registry.catalog().delete_declaration(&id).await {
        // Nothing to delete is no change (KMFDDM's 304): scripts that delete
        // idempotently treat it as success.
        Ok(deleted) => Ok(change_status(deleted)),
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

/// A required query parameter given empty (`?set=`) names nothing: refused like a missing
/// one rather than looked up (and answered 304) as the name "".
fn non_empty<'a>(name: &str, value: &'a str) -> Result<&'a str, Rejection> {
    if value.is_empty() {
        return Err(Rejection::api(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("{name} is empty"),
        ));
    }
    Ok(value)
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
        .change_set(set, non_empty("declaration", &query.declaration)?, add)
        .await
        .map_err(catalog_error)?;
    Ok(changed_response(state, change, notify_wanted(query.nonotify.as_deref())).await)
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

/// Assign or unassign one set of one enrollment; answers whether that changed anything.
async fn assignment_changed(
    state: &AppState,
    enrollment: &str,
    set: &str,
    assign: bool,
    sync: bool,
) -> Result<bool, Rejection> {
    let ids = [enrollment.to_string()];
    let mut outcome = commands::assign_set(&state.registry, &*state.push, &ids, set, assign, sync)
        .await
        .map_err(Rejection::store_failure)?;
    match outcome.pop().map(|(_, changed)| changed) {
        Some(Ok(changed)) => Ok(changed),
        Some(Err(e)) => Err(device_error(e)),
        None => Err(device_error(DeviceError::Unavailable)),
    }
}

/// KMFDDM's answer to a write: 204 when something changed, 304 when nothing did.
fn change_status(changed: bool) -> HttpResponse {
    match changed {
        true => HttpResponse::NoContent().finish(),
        false => HttpResponse::NotModified().finish(),
    }
}

async fn change_assignment(
    state: &AppState,
    enrollment: &str,
    query: &SetQuery,
    assign: bool,
) -> Result<HttpResponse, Rejection> {
    let sync = notify_wanted(query.nonotify.as_deref());
    let set = non_empty("set", &query.set)?;
    let changed = assignment_changed(state, enrollment, set, assign, sync).await?;
    Ok(change_status(changed))
}

/// `DELETE /api/v1/ddm/enrollment-sets-all/{enrollment}` (also at KMFDDM's own path
/// `…/enrollment-sets-all/sets/{enrollment}`): unassign every set of the enrollment.
async fn unassign_all_sets(
    enrollment: web::Path<String>,
    flag: web::Query<NotifyFlag>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let view = ddm_view(&state, &enrollment).await?;
    let mut changed = false;
    for set in &view.state.sets {
        changed |= assignment_changed(&state, &enrollment, set, false, flag.notify()).await?;
    }
    Ok(change_status(changed))
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

/// The DDM views of the comma-separated enrollments of a KMFDDM status route that
/// exist: KMFDDM leaves unknown ids (and ids with nothing to show) out of its answer.
async fn known_views(
    req: &HttpRequest,
    ids: &str,
    state: &AppState,
) -> Result<Vec<(String, DdmView)>, Rejection> {
    let ids = route_ids(req, ids)?;
    let mut known = Vec::with_capacity(ids.len());
    for (id, view) in state.registry.call_all(&ids, GetDdmView).await {
        match view {
            Ok(view) => known.push((id, view)),
            Err(DeviceError::UnknownEnrollment(_)) => {}
            Err(e) => return Err(device_error(e)),
        }
    }
    Ok(known)
}

/// `{"<id>": [rows], ...}` with only the enrollments that have rows (`{}` when none).
fn rows_by_enrollment(
    views: &[(String, DdmView)],
    rows_of: impl Fn(&DdmView, &str) -> Vec<Value>,
) -> HttpResponse {
    let answer: serde_json::Map<String, Value> = views
        .iter()
        .filter_map(|(id, view)| {
            let received = view
                .state
                .status
                .last_report_at
                .map(rfc3339)
                .unwrap_or_default();
            let rows = rows_of(view, &received);
            (!rows.is_empty()).then(|| (id.clone(), Value::Array(rows)))
        })
        .collect();
    HttpResponse::Ok().json(answer)
}

/// `GET /api/v1/ddm/declaration-status/{id[,id...]}`: each declaration as the device
/// reported it, with `current` = the reported token is the one served now (KMFDDM's shape).
async fn declaration_status(
    req: HttpRequest,
    ids: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let views = known_views(&req, &ids, &state).await?;
    let catalog = state.registry.catalog();
    Ok(rows_by_enrollment(&views, |view, received| {
        let snapshot = catalog.manifest(&view.state.sets);
        kmfddm::declaration_status(&view.state.status, &snapshot.manifest, received)
    }))
}

/// `GET /api/v1/ddm/status-errors/{id[,id...]}`: declarations the device could not apply
/// and the status items it could not report (KMFDDM's shape; `{}` when there are none).
async fn status_errors(
    req: HttpRequest,
    ids: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let views = known_views(&req, &ids, &state).await?;
    Ok(rows_by_enrollment(&views, |view, received| {
        kmfddm::status_errors(&view.state.status, received)
    }))
}

#[derive(Deserialize)]
struct PrefixQuery {
    prefix: Option<String>,
}

/// `GET /api/v1/ddm/status-values/{id[,id...]}?prefix=`: reported values as strings under
/// their `.StatusItems.…` paths; `prefix` is KMFDDM's `LIKE` pattern (`.StatusItems.device.%`).
async fn status_values(
    req: HttpRequest,
    ids: web::Path<String>,
    query: web::Query<PrefixQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let views = known_views(&req, &ids, &state).await?;
    let prefix = query
        .prefix
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(PathPrefix::new);
    Ok(rows_by_enrollment(&views, |view, received| {
        kmfddm::status_values(&view.state.status, prefix.as_ref(), received)
    }))
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
        // Lossy: an id with bytes outside ASCII is no enrollment (404), not a missing header.
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
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

/// How long a fleet route waits for every shard to be counted before answering 503.
const TALLY_PATIENCE: Duration = Duration::from_secs(5);
/// How often it looks again meanwhile.
const TALLY_RETRY: Duration = Duration::from_millis(200);

/// The fleet's `view` summed over every node, once every shard is counted by exactly one
/// (after a start or a shard move, the new owner first recounts the shard); 503 with the
/// progress if that takes longer than [`TALLY_PATIENCE`].
async fn counted_fleet(state: &AppState, view: FleetView) -> Result<FleetShare, Rejection> {
    let started = std::time::Instant::now();
    loop {
        let incomplete = match fleet_view(&state.registry, view).await {
            Ok(fleet) => {
                metrics::histogram!("orchard_fleet_view_seconds")
                    .record(started.elapsed().as_secs_f64());
                return Ok(fleet);
            }
            Err(incomplete) => incomplete,
        };
        if started.elapsed() >= TALLY_PATIENCE {
            metrics::counter!("orchard_fleet_views_refused_total").increment(1);
            tracing::info!(%incomplete, "fleet view refused: shards are being recounted");
            return Err(Rejection::api(
                StatusCode::SERVICE_UNAVAILABLE,
                "fleet_tally_warming",
                format!("the fleet tally is being recounted after a start or a shard move: {incomplete}; retry shortly"),
            ));
        }
        tokio::time::sleep(TALLY_RETRY).await;
    }
}

/// `GET /api/v1/ddm/fleet/declarations`: per declaration, how many enrollments have it
/// active, invalid, pending (assigned, not reported at its current token) or on an old
/// token. Answered from the fleet tally against the current manifests.
async fn fleet_declarations(state: web::Data<AppState>) -> Result<HttpResponse, Rejection> {
    let fleet = counted_fleet(&state, FleetView::Declarations).await?;
    Ok(HttpResponse::Ok().json(fleet.declarations))
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
    let reports: Vec<Value> = kept_reports(&state, &id)
        .await?
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

/// The raw status reports kept for a known enrollment, oldest first.
async fn kept_reports(state: &AppState, id: &str) -> Result<Vec<StoredReport>, Rejection> {
    let known = state
        .store
        .enrollment(id)
        .await
        .map_err(Rejection::store_failure)?;
    if known.is_none() {
        return Err(device_error(DeviceError::UnknownEnrollment(id.to_string())));
    }
    state
        .store
        .ddm_reports(id)
        .await
        .map_err(Rejection::store_failure)
}

#[derive(Deserialize)]
struct ReportQuery {
    index: Option<String>,
    status_id: Option<String>,
}

fn no_such_report(detail: String) -> Rejection {
    Rejection::api(StatusCode::NOT_FOUND, "status_report_not_found", detail)
}

/// `GET /api/v1/ddm/status-report/{id}?index=N` (KMFDDM): a kept status report exactly
/// as the device sent it, index 0 being the newest, with KMFDDM's `Last-Modified` and
/// `X-Status-Report-Index` headers. Orchard keeps the last two reports and no status ids.
async fn status_report(
    id: web::Path<String>,
    query: web::Query<ReportQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Rejection> {
    let index = match query.index.as_deref() {
        None => 0,
        Some(text) => text.parse::<u32>().map_err(|_| {
            Rejection::api(
                StatusCode::BAD_REQUEST,
                "bad_index",
                format!(
                    "index must be 0 (the newest report) to {}, not {text:?}",
                    u32::MAX
                ),
            )
        })? as usize,
    };
    if let Some(status_id) = &query.status_id {
        return Err(no_such_report(format!(
            "no report has status id {status_id}: Orchard keeps no status ids, ask by index"
        )));
    }
    let reports = kept_reports(&state, &id).await?;
    let Some(report) = reports.iter().rev().nth(index) else {
        return Err(no_such_report(format!(
            "enrollment {id} has {} kept status report(s); index {index} is past them",
            reports.len()
        )));
    };
    let received = UNIX_EPOCH + Duration::from_secs(report.received_at.max(0) as u64);
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header(header::LastModified(received.into()))
        .insert_header(("X-Status-Report-Index", index.to_string()))
        .body(report.json.clone()))
}

/// `GET /api/v1/ddm/diagnosis`: enrollments per doctor rule across the fleet, as of the
/// start of the current minute (stall deadlines are tallied to the minute).
async fn fleet_diagnosis(state: web::Data<AppState>) -> Result<HttpResponse, Rejection> {
    let as_of = minute_floor(crate::device::now_secs());
    let fleet = counted_fleet(&state, FleetView::Diagnosis { as_of }).await?;
    Ok(HttpResponse::Ok().json(json!({
        "rules": fleet.rules,
        "enrollments": fleet.enrollments,
        "as_of": rfc3339(as_of),
    })))
}
