//! `orchard serve`: wire the store, CA, verifier, registry and push into the HTTP server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::cluster::{ClusterNode, ClusterSettings, Placement, ShardHost, ShardMap};
use crate::config::{ServeArgs, StoreKind, UserAuthenticateMode};
use crate::ddm::catalog::{Catalog, CatalogError};
use crate::device::{DeviceSettings, Registry, UserAuthenticatePolicy};
use crate::enroll::EnrollmentProfiles;
use crate::forward::{Forwarder, PeerUrl};
use crate::http::{self, AppState, HttpSettings};
use crate::identity::{CertificateAuthority, IdentityVerifier};
use crate::push::apns::{ApnsPush, ApnsSettings, Endpoint, DEVELOPMENT_URL, PRODUCTION_URL};
use crate::store::embedded::EmbeddedStore;
use crate::store::scylla::{ScyllaConfig, ScyllaStore};
use crate::store::{Store, StoreError};
use crate::telemetry;
use crate::webhook::client::{Client, WebhookUrl};
use crate::webhook::{Deliverer, WebhookSettings};

const API_KEY_FILE: &str = "api-key";

/// A startup failure, reported as one line before exiting non-zero.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartupError(String);

fn fail(context: &str, e: impl std::fmt::Display) -> StartupError {
    StartupError(format!("{context}: {e}"))
}

pub fn serve(args: ServeArgs) -> Result<(), StartupError> {
    telemetry::init_logging();
    let metrics = telemetry::install_metrics().map_err(|e| fail("metrics", e))?;
    validate(&args)?;
    telemetry::series::export_at_startup(store_series(&args), membership(&args));
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        fail(
            &format!("cannot create data dir {}", args.data_dir.display()),
            e,
        )
    })?;
    // Bound first: a cluster node advertises the address it really listens on.
    let listener = std::net::TcpListener::bind(&args.listen)
        .map_err(|e| fail(&format!("cannot listen on {}", args.listen), e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| fail("listener address", e))?;
    let (store, cluster): (Arc<dyn Store>, Option<Arc<ClusterNode>>) = match args.store {
        StoreKind::Embedded => {
            let store =
                EmbeddedStore::open_with_cache(&args.data_dir, args.store_cache_mb.max(1) << 20)
                    .map_err(|e| fail("cannot open the embedded store", e))?;
            (store, None)
        }
        StoreKind::Scylla => {
            let store = ScyllaStore::start(scylla_config(&args)?)
                .map_err(|e| fail("cannot open the CQL store", e))?;
            let node = match &args.cluster_secret {
                Some(_) => {
                    let node =
                        ClusterNode::new(cluster_settings(&args, local_addr)?, store.clone());
                    store.fence_with(node.clone());
                    Some(node)
                }
                None => None,
            };
            (store, node)
        }
    };
    let placement: Arc<dyn Placement> = match &cluster {
        Some(node) => node.clone(),
        None => Arc::new(ShardMap::single_node("local")),
    };
    let webhooks = webhook_settings(&args)?;
    let ca = Arc::new(identity_ca(&args, &store)?);
    let mut anchors = vec![ca.ca_cert_der().clone()];
    if let Some(path) = &args.identity_ca {
        anchors.extend(read_pem_certs(path)?);
    }
    let verifier = Arc::new(
        IdentityVerifier::with_cache_capacity(anchors.clone(), args.identity_cache_entries)
            .map_err(|e| fail("identity CA bundle", e))?,
    );
    let (api_key, generated) = api_key(&args, &store)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(http::tls::server_config(cert, key, &anchors).map_err(|e| fail("TLS", e))?)
        }
        _ => None,
    };
    let server_url = args
        .server_url
        .clone()
        .or_else(|| tls.as_ref().map(|_| format!("https://{}", args.listen)));
    let sign_message = tls.is_none() && args.client_cert_header.is_none();
    let profiles = EnrollmentProfiles::new(
        server_url.clone(),
        Arc::clone(&ca),
        sign_message,
        args.access_rights,
        args.organization.clone(),
    );
    let push = Arc::new(
        ApnsPush::start(apns_settings(&args)?, Arc::clone(&store))
            .map_err(|e| fail("APNs engine", e))?,
    );
    let settings = DeviceSettings {
        repush_after: Duration::from_secs(args.repush_after_secs.max(1)),
        repush_max_interval: Duration::from_secs(args.repush_max_secs.max(1)),
        idle_timeout: Duration::from_secs(args.actor_idle_secs.max(1)),
        max_resident: args.max_resident_actors.max(1),
        user_authenticate: match args.user_authenticate {
            UserAuthenticateMode::Decline => UserAuthenticatePolicy::Decline,
            UserAuthenticateMode::EmptyChallenge => UserAuthenticatePolicy::EmptyChallenge,
        },
        ddm_stall_after_secs: args.ddm_stall_after as i64,
        retro: args.retro,
    };
    let http_settings = HttpSettings {
        client_cert_header: args.client_cert_header.clone(),
        max_body_bytes: args.max_body_bytes,
        body_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
    };
    let timeout = http_settings.body_timeout;
    actix_web::rt::System::new().block_on(async move {
        publish_push_topics(&*store).await;
        let catalog = Arc::new(load_catalog(&store).await?);
        let registry = Registry::new(
            Arc::clone(&store),
            catalog,
            settings,
            Arc::clone(&placement),
        );
        if let Some(webhooks) = webhooks {
            let notifier = Deliverer::start(Arc::clone(&store), placement, webhooks)
                .map_err(|e| fail("webhook deliverer", e))?;
            registry.record_webhooks(notifier);
        }
        let forwarder = match (&cluster, &args.cluster_secret) {
            (Some(node), Some(secret)) => {
                let forwarder = Forwarder::new(node.clone(), secret);
                registry.reach_peers(forwarder.clone());
                Some(forwarder)
            }
            _ => None,
        };
        let membership = match &cluster {
            Some(node) => Some(join_cluster(node.clone(), registry.clone()).await?),
            None => None,
        };
        if membership.is_none() {
            registry.tally().take_all();
        }
        let recount = Arc::clone(&registry);
        actix_web::rt::spawn(async move { recount.tally().recount(&**recount.store()).await });
        let mut state = AppState::new(
            http_settings,
            Arc::clone(&store),
            Arc::clone(&registry),
            verifier,
            push.clone(),
            profiles,
            &api_key,
            metrics,
        );
        state.cluster = cluster;
        state.forwarder = forwarder;
        let state = web::Data::new(state);
        let app_state = state.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .configure(http::routes)
        })
        .on_connect(http::identity::capture_peer_certificate)
        .client_request_timeout(timeout)
        .client_disconnect_timeout(Duration::from_secs(5))
        .keep_alive(Duration::from_secs(75))
        // An HTTP/2 answer is a HEADERS and a DATA frame written apart: with Nagle's
        // algorithm the second waits for the peer's delayed ACK (40 ms on Linux).
        .tcp_nodelay(true)
        .shutdown_timeout(10);
        if let Some(workers) = args.workers {
            server = server.workers(workers.max(1));
        }
        let server = match tls {
            Some(config) => server.listen_rustls_0_23(listener, config),
            // Cleartext HTTP/1.1 for devices behind a proxy, HTTP/2 (prior knowledge) for
            // the other nodes of a cluster, on one listener.
            None => server.listen_auto_h2c(listener),
        }
        .map_err(|e| fail(&format!("cannot listen on {}", args.listen), e))?;
        let scheme = if args.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let addrs = server.addrs();
        print_banner(
            &args,
            scheme,
            &addrs,
            &api_key,
            generated,
            server_url.as_deref(),
        );
        actix_web::rt::spawn(sweep_actors(Arc::clone(&registry)));
        let interval = Duration::from_secs(args.repush_interval_secs.max(1));
        if args.store == StoreKind::Scylla {
            let catalog = Arc::clone(registry.catalog());
            let follow = crate::shared_state::follow(Arc::clone(&store), catalog, push.clone());
            actix_web::rt::spawn(follow);
        }
        actix_web::rt::spawn(sweep_repushes(registry, store, push, interval));
        let server = server.disable_signals().run();
        actix_web::rt::spawn(stop_on_signal(server.handle(), membership));
        server.await.map_err(|e| fail("server", e))
    })
}

/// A running cluster membership: how to stop it, and its task.
struct Membership {
    stop: tokio::sync::oneshot::Sender<()>,
    task: actix_web::rt::task::JoinHandle<()>,
}

/// Start this node's membership and wait for its first round (heartbeat written, free
/// shards taken), so a node that answers has a place in the cluster.
async fn join_cluster(
    node: Arc<ClusterNode>,
    host: Arc<dyn ShardHost>,
) -> Result<Membership, StartupError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (joined, on_joined) = tokio::sync::oneshot::channel();
    let task = actix_web::rt::spawn(node.run(host, joined, async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(STARTUP_READ_PATIENCE, on_joined)
        .await
        .map_err(|_| StartupError("could not join the cluster: no round succeeded".into()))?
        .map_err(|_| StartupError("the cluster membership task stopped".into()))?;
    Ok(Membership { stop, task })
}

/// On SIGTERM or SIGINT: a cluster node hands every shard over first (actors flushed,
/// leases freed) while it still answers — requests for moved shards get 503 and are
/// retried elsewhere — and only then stops serving HTTP.
async fn stop_on_signal(server: actix_web::dev::ServerHandle, membership: Option<Membership>) {
    shutdown_signal().await;
    tracing::info!("stopping");
    if let Some(membership) = membership {
        let _ = membership.stop.send(());
        let _ = membership.task.await;
    }
    server.stop(true).await;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot listen for signals; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

const NODE_ID_FILE: &str = "node-id";

/// `--node-id`, `--advertise-url` and `--lease-secs`; a node id not given is generated
/// once and kept in the data directory, so a restarted node is the same node, and the
/// advertise URL defaults to the address the listener is bound to.
fn cluster_settings(
    args: &ServeArgs,
    listening_on: std::net::SocketAddr,
) -> Result<ClusterSettings, StartupError> {
    let node_id = match &args.node_id {
        Some(id) => id.clone(),
        None => {
            let path = args.data_dir.join(NODE_ID_FILE);
            match std::fs::read_to_string(&path) {
                Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
                _ => {
                    let id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
                    std::fs::write(&path, &id)
                        .map_err(|e| fail(&format!("cannot write {}", path.display()), e))?;
                    id
                }
            }
        }
    };
    if args.lease_secs < 2 {
        return Err(StartupError("--lease-secs must be at least 2".into()));
    }
    if args.tls_cert.is_some() {
        return Err(StartupError(
            "cluster mode: nodes call each other over cleartext HTTP/2 on the listener, so \
             terminate device TLS at the proxy (--client-cert-header) instead of --tls-cert"
                .into(),
        ));
    }
    let advertise_url = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{listening_on}"));
    let peer = PeerUrl::parse(&advertise_url).map_err(|e| fail("--advertise-url", e))?;
    if peer
        .host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(StartupError(format!(
            "cluster mode: the other nodes cannot reach {advertise_url}; \
             set --advertise-url to this node's address"
        )));
    }
    Ok(ClusterSettings {
        node_id,
        advertise_url,
        lease: Duration::from_secs(args.lease_secs),
    })
}

fn store_series(args: &ServeArgs) -> telemetry::series::StoreSeries {
    match args.store {
        StoreKind::Embedded => telemetry::series::StoreSeries::Embedded,
        StoreKind::Scylla => telemetry::series::StoreSeries::Cql,
    }
}

fn membership(args: &ServeArgs) -> telemetry::series::Membership {
    match (args.store, &args.cluster_secret) {
        (StoreKind::Scylla, Some(_)) => telemetry::series::Membership::Clustered,
        _ => telemetry::series::Membership::Alone,
    }
}

/// How long startup waits out a store that answers but cannot serve reads yet (a
/// database node that just died and is not yet known to be down).
const STARTUP_READ_PATIENCE: Duration = Duration::from_secs(60);

/// The DDM catalog, read again while the store reports itself unavailable.
async fn load_catalog(store: &Arc<dyn Store>) -> Result<Catalog, StartupError> {
    let deadline = std::time::Instant::now() + STARTUP_READ_PATIENCE;
    loop {
        match Catalog::load(Arc::clone(store)).await {
            Err(CatalogError::Store(e @ StoreError::Unavailable(_)))
                if std::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %e, "declaration catalog not readable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            loaded => return loaded.map_err(|e| fail("declaration catalog", e)),
        }
    }
}

/// Every stored push topic's series (its certificate's expiry among them), for alerting
/// from the first scrape on.
async fn publish_push_topics(store: &dyn Store) {
    match store.push_certs().await {
        Ok(certs) => {
            for cert in certs {
                telemetry::series::push_topic(&cert.topic, cert.not_after);
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read push certificates"),
    }
}

/// Wake devices that have pending commands but have not checked in (APNs is best effort).
async fn sweep_repushes(
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    push: Arc<ApnsPush>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Err(e) =
            crate::commands::repush_due(&registry, &*store, &*push, crate::device::now_secs()).await
        {
            tracing::warn!(error = %e, "re-push sweep failed");
        }
    }
}

/// `--webhook-*`, when `--webhook-url` is set.
fn webhook_settings(args: &ServeArgs) -> Result<Option<WebhookSettings>, StartupError> {
    let Some(url) = &args.webhook_url else {
        return Ok(None);
    };
    let url = WebhookUrl::parse(url).map_err(|e| fail("--webhook-url", e))?;
    let key = args
        .webhook_hmac_key
        .as_ref()
        .map(|k| k.as_bytes().to_vec());
    let timeout = Duration::from_secs(args.webhook_timeout_secs.max(1));
    let extra_roots = args
        .webhook_ca
        .as_deref()
        .map(read_pem_certs)
        .transpose()?
        .unwrap_or_default();
    let client =
        Client::new(url, key, timeout, &extra_roots).map_err(|e| fail("--webhook-url", e))?;
    Ok(Some(WebhookSettings {
        client,
        max_age: Duration::from_secs(args.webhook_max_age_secs.max(1)),
    }))
}

fn apns_settings(args: &ServeArgs) -> Result<ApnsSettings, StartupError> {
    let default_url = if args.apns_development {
        DEVELOPMENT_URL
    } else {
        PRODUCTION_URL
    };
    let url = args.apns_url.as_deref().unwrap_or(default_url);
    let mut settings = ApnsSettings::new(Endpoint::parse(url).map_err(|e| fail("--apns-url", e))?);
    if let Some(path) = &args.apns_ca {
        settings.extra_roots = read_pem_certs(path)?;
    }
    settings.connections_per_topic = args.apns_connections.max(1);
    settings.expiration = Duration::from_secs(args.apns_expiration_secs);
    Ok(settings)
}

/// Keep resident actors under their bound and drop command bodies nobody holds.
async fn sweep_actors(registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        registry.evict_excess();
        registry.prune_bodies();
    }
}

fn validate(args: &ServeArgs) -> Result<(), StartupError> {
    if let Some(url) = &args.server_url {
        if !url.starts_with("https://") {
            return Err(StartupError(format!(
                "--server-url must be an https:// URL (devices refuse anything else), got {url}"
            )));
        }
    }
    for path in [
        &args.tls_cert,
        &args.tls_key,
        &args.identity_ca,
        &args.apns_ca,
    ]
    .into_iter()
    .flatten()
    {
        std::fs::metadata(path).map_err(|e| fail(&format!("cannot read {}", path.display()), e))?;
    }
    if !(1..=8191).contains(&args.access_rights) {
        return Err(StartupError(format!(
            "--access-rights must be within 1..=8191, got {}",
            args.access_rights
        )));
    }
    Ok(())
}

/// The CQL store's settings from the `--scylla-*` flags.
fn scylla_config(args: &ServeArgs) -> Result<ScyllaConfig, StartupError> {
    if args.scylla_nodes.is_empty() {
        return Err(StartupError(
            "--store scylla needs --scylla-nodes HOST:PORT[,HOST:PORT...]".into(),
        ));
    }
    if args.scylla_replication == 0 {
        return Err(StartupError(
            "--scylla-replication must be at least 1".into(),
        ));
    }
    if let Some(ca) = &args.scylla_ca {
        std::fs::metadata(ca).map_err(|e| fail(&format!("cannot read {}", ca.display()), e))?;
    }
    Ok(ScyllaConfig {
        nodes: args.scylla_nodes.clone(),
        keyspace: args.scylla_keyspace.clone(),
        replication: args.scylla_replication,
        datacenter: args.scylla_datacenter.clone(),
        user: args.scylla_user.clone(),
        password: args.scylla_password.clone(),
        ca: args.scylla_ca.clone(),
        request_timeout: Duration::from_millis(args.scylla_timeout_ms.max(1)),
        max_in_flight: args.scylla_max_in_flight.max(1),
        node_name: args.listen.clone(),
    })
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StartupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(&format!("cannot read CA bundle {}", path.display()), e))?;
    if certs.is_empty() {
        return Err(StartupError(format!(
            "no PEM certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// The API key from the flag, else from the data dir, else a new one stored there.
/// `--api-key`, else the generated key kept in the data dir — on a CQL store the one
/// every node on the keyspace shares (the first node's).
fn api_key(args: &ServeArgs, store: &Arc<dyn Store>) -> Result<(String, bool), StartupError> {
    if let Some(key) = &args.api_key {
        return Ok((key.clone(), false));
    }
    let path: PathBuf = args.data_dir.join(API_KEY_FILE);
    let stored = std::fs::read_to_string(&path)
        .ok()
        .map(|key| key.trim().to_string());
    let offered = stored
        .clone()
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 24]>()));
    let key = match args.store {
        StoreKind::Embedded => offered.clone(),
        StoreKind::Scylla => {
            let kept = block_on(claim(&**store, CLAIM_API_KEY, offered.clone().into_bytes()))?
                .map_err(|e| fail("cannot read the cluster's API key", e))?;
            String::from_utf8(kept).map_err(|e| fail("the cluster's API key", e))?
        }
    };
    if stored.as_deref() != Some(key.as_str()) {
        let _ = std::fs::remove_file(&path);
        write_private(&path, key.as_bytes())
            .map_err(|e| fail(&format!("cannot write {}", path.display()), e))?;
    }
    Ok((key.clone(), stored.is_none() && key == offered))
}

/// How long a starting node retries a claim the database could not answer (it may be
/// starting too, or overloaded by the other nodes' starts).
const CLAIM_PATIENCE: Duration = Duration::from_secs(60);

/// [`Store::claim`], retried while the store is unavailable. A retry is safe: a claim
/// that landed unacknowledged answers the value it stored.
async fn claim(store: &dyn Store, name: &str, value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    let started = std::time::Instant::now();
    loop {
        match store.claim(name, value.clone()).await {
            Err(StoreError::Unavailable(reason)) if started.elapsed() < CLAIM_PATIENCE => {
                tracing::warn!(claim = name, %reason, "the store did not answer a startup claim; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            answered => return answered,
        }
    }
}

/// The claims every node on a CQL keyspace shares.
const CLAIM_API_KEY: &str = "api-key";
const CLAIM_IDENTITY_CA: &str = "identity-ca";

/// The identity CA. On the embedded store, the data dir's (created on first start). On a
/// CQL store, the one every node on the keyspace shares: the first node to start offers
/// its own (or a new one) and the store keeps it; the others adopt it into their data
/// dirs. A data dir whose CA differs from the keyspace's is refused: the devices it
/// enrolled would not be trusted by the other nodes.
fn identity_ca(
    args: &ServeArgs,
    store: &Arc<dyn Store>,
) -> Result<CertificateAuthority, StartupError> {
    let dir = &args.data_dir;
    let ca_error = |e| fail("identity CA", e);
    if args.store == StoreKind::Embedded {
        return CertificateAuthority::load_or_create(dir).map_err(ca_error);
    }
    let local = match CertificateAuthority::exists_in(dir).map_err(ca_error)? {
        true => Some(CertificateAuthority::load_or_create(dir).map_err(ca_error)?),
        false => None,
    };
    let offered = match &local {
        Some(ca) => ca.to_pem_bundle(),
        None => CertificateAuthority::generate()
            .map_err(ca_error)?
            .to_pem_bundle(),
    };
    let kept = block_on(claim(&**store, CLAIM_IDENTITY_CA, offered.into_bytes()))?
        .map_err(|e| fail("cannot read the cluster's identity CA", e))?;
    let kept = String::from_utf8(kept).map_err(|e| fail("the cluster's identity CA", e))?;
    let shared = CertificateAuthority::from_pem_bundle(&kept, Path::new("the store's identity CA"))
        .map_err(ca_error)?;
    match local {
        None => {
            shared.save_in(dir).map_err(ca_error)?;
            Ok(shared)
        }
        Some(local) if local.ca_cert_der() == shared.ca_cert_der() => Ok(local),
        Some(_) => Err(StartupError(format!(
            "the identity CA in {} is not the one the other nodes on this keyspace use; move \
             identity-ca.pem and identity-ca.key aside (pass the old certificate with \
             --identity-ca to keep trusting the devices it enrolled)",
            dir.display()
        ))),
    }
}

/// Run one store call before the server's runtime exists.
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, StartupError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail("startup runtime", e))?;
    Ok(runtime.block_on(future))
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents)
}

fn print_banner(
    args: &ServeArgs,
    scheme: &str,
    addrs: &[std::net::SocketAddr],
    api_key: &str,
    generated: bool,
    server_url: Option<&str>,
) {
    let mut out = std::io::stdout().lock();
    for addr in addrs {
        let _ = writeln!(out, "orchard listening on {scheme}://{addr}");
    }
    let _ = writeln!(out, "data dir: {}", args.data_dir.display());
    let origin = match (generated, args.api_key.is_some()) {
        (true, _) => "generated, stored in the data dir",
        (false, true) => "configured",
        (false, false) => "kept in the data dir",
    };
    let _ = writeln!(out, "API key ({origin}): {api_key}");
    match server_url {
        Some(url) => {
            let _ = writeln!(
                out,
                "enrollment URL: {}/mdm/enroll",
                url.trim_end_matches('/')
            );
        }
        None => {
            let _ = writeln!(out, "enrollment URL: {scheme}://{}/mdm/enroll (answers 409 until --server-url https://... is set)", addrs.first().map(|a| a.to_string()).unwrap_or_default());
        }
    }
    let _ = out.flush();
}
