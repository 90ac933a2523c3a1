//! The HTTP surface: device endpoints (`/mdm`, `/checkin`, `/mdm/enroll`), the admin API
//! (`/api/v1/...` and NanoMDM's `/migration`, API-key protected), operations endpoints (`/metrics`, `/healthz`,
//! `/readyz`, `/version`), and the node-to-node routes under `/internal/` (cluster mode,
//! signed with the cluster secret). Handlers translate HTTP to device-actor messages and
//! back; protocol decoding lives in `protocol`, state in `device`.

mod admin;
mod auth;
pub mod body;
mod ddm;
mod device;
pub mod endpoint;
mod extractors;
pub mod identity;
mod internal;
mod migration;
mod nanohub;
pub mod rejection;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::device::Registry;
use crate::enroll::EnrollmentProfiles;
use crate::identity::IdentityVerifier;
use crate::push::Push;
use crate::store::Store;

/// Request-handling settings derived from the command line.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub client_cert_header: Option<String>,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
}

/// Everything a handler may use; shared by all workers.
pub struct AppState {
    pub settings: HttpSettings,
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub verifier: Arc<IdentityVerifier>,
    pub push: Arc<dyn Push>,
    pub profiles: EnrollmentProfiles,
    pub api_key: auth::ApiKey,
    pub metrics: PrometheusHandle,
    /// This node's place in the cluster (`--store scylla --cluster-secret`).
    pub cluster: Option<Arc<crate::cluster::ClusterNode>>,
    /// Node-to-node calls (cluster mode).
    pub forwarder: Option<Arc<crate::forward::Forwarder>>,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: HttpSettings,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        verifier: Arc<IdentityVerifier>,
        push: Arc<dyn Push>,
        profiles: EnrollmentProfiles,
        api_key: &str,
        metrics: PrometheusHandle,
    ) -> Self {
        AppState {
            settings,
            store,
            registry,
            verifier,
            push,
            profiles,
            api_key: auth::ApiKey::new(api_key),
            metrics,
            cluster: None,
            forwarder: None,
        }
    }
}

/// Where the admin API is mounted.
pub const API_SCOPE: &str = "/api/v1";

/// The admin API's routes under [`API_SCOPE`] (all behind the API key).
fn api_endpoints() -> Vec<endpoint::Endpoint> {
    [nanohub::endpoints(), ddm::endpoints(), admin::endpoints()]
        .into_iter()
        .flatten()
        .collect()
}

/// NanoMDM's migration route (behind the API key, outside [`API_SCOPE`]).
fn migration_endpoint() -> endpoint::Endpoint {
    endpoint::Endpoint::new("/migration").put(migration::import)
}

/// The device endpoints and the operations endpoints: plain-text answers, 405 included.
fn device_and_operations_endpoints() -> Vec<endpoint::Endpoint> {
    use endpoint::Endpoint;
    vec![
        Endpoint::new("/mdm").put(device::mdm),
        Endpoint::new("/checkin").put(device::checkin_only),
        Endpoint::new("/mdm/enroll").get(device::enroll),
        Endpoint::new("/metrics").get(render_metrics),
        Endpoint::new("/healthz").get(healthz),
        Endpoint::new("/readyz").get(readyz),
        Endpoint::new("/version").get(version),
    ]
}

/// The OpenAPI document (no API key: it describes, it discloses nothing).
fn openapi_endpoint() -> endpoint::Endpoint {
    endpoint::Endpoint::new(format!("{API_SCOPE}/openapi.json")).get(admin::openapi)
}

/// Every path the OpenAPI document describes, with the methods the server serves there:
/// the same values the router is built from, so a test can hold the document to them.
pub fn admin_routes() -> Vec<(String, Vec<actix_web::http::Method>)> {
    let scoped = api_endpoints()
        .into_iter()
        .map(|e| (format!("{API_SCOPE}{}", e.path()), e.methods()));
    [openapi_endpoint(), migration_endpoint()]
        .iter()
        .map(endpoint::Endpoint::listed)
        .chain(scoped)
        .collect()
}

/// The device and operations paths with the methods served there (tests check their 405s).
pub fn device_and_operations_routes() -> Vec<(String, Vec<actix_web::http::Method>)> {
    device_and_operations_endpoints()
        .iter()
        .map(endpoint::Endpoint::listed)
        .collect()
}

/// All routes, for `App::configure`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    use rejection::Audience::{Api, Device};
    extractors::configure(cfg);
    let api = api_endpoints()
        .into_iter()
        .fold(web::scope(API_SCOPE), |scope, e| {
            scope.service(e.into_resource(Api))
        })
        .wrap(from_fn(auth::require_api_key))
        .default_service(web::to(unknown_api_path));
    cfg.service(
        web::scope("")
            .wrap(from_fn(record_request))
            .configure(|cfg| {
                for endpoint in device_and_operations_endpoints() {
                    cfg.service(endpoint.into_resource(Device));
                }
            })
            .service(openapi_endpoint().into_resource(Api))
            .configure(internal::routes)
            .service(
                migration_endpoint()
                    .into_resource(Api)
                    .wrap(from_fn(auth::require_api_key)),
            )
            .service(api),
    );
}

/// A path under [`API_SCOPE`] that no route serves: the JSON error, like every other
/// refusal of the admin API (actix's own 404 is an empty body).
async fn unknown_api_path(
    req: actix_web::HttpRequest,
) -> Result<HttpResponse, rejection::Rejection> {
    Err(rejection::Rejection::api(
        actix_web::http::StatusCode::NOT_FOUND,
        "unknown_path",
        format!("no admin route at {}", req.path()),
    ))
}

/// Count and time every request by route pattern (not raw path: ids would explode
/// label cardinality).
async fn record_request(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let endpoint = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let response = next.call(req).await?;
    let status = response.status().as_u16().to_string();
    metrics::counter!("orchard_http_requests_total", "endpoint" => endpoint.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!("orchard_http_request_duration_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
    Ok(response)
}

/// `/metrics`; the gauges that summarise the fleet are computed for each scrape.
async fn render_metrics(state: web::Data<AppState>) -> HttpResponse {
    metrics::gauge!("orchard_resident_actors_registered")
        .set(state.registry.resident_count() as f64);
    let catalog = Arc::clone(state.registry.catalog());
    let as_of = crate::ddm::fleet::minute_floor(crate::device::now_secs());
    state
        .registry
        .tally()
        .publish_fleet_gauges(&|sets| catalog.manifest(sets), as_of);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Ready when the store answers a read and, in a cluster, this node's lease holds.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state
        .cluster
        .as_ref()
        .is_some_and(|node| !node.is_serving())
    {
        return HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body("cluster lease lapsed: heartbeats are not reaching the store\n");
    }
    match state.store.ping().await {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n"),
        Err(e) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("store unavailable: {e}\n")),
    }
}

async fn version() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))
}
