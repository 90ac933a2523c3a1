//! Following the state every node caches when another node changes it (CQL store).
//!
//! The DDM catalog and the push certificates are written through whichever node an
//! operator calls, and every node serves from memory. Each write also raises a version
//! in the store (`Store::shared_versions`, written after the rows); every node polls the
//! versions each second and, on a change, reads the catalog again (cached manifests
//! dropped) or reconnects the topics whose certificate changed. A change through one
//! node is therefore in effect on all of them within about a second (contract §4: 2 s).
//! Catalog writes also check the version first, so a change made
//! through one node is never computed against an older catalog on another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::ddm::catalog::Catalog;
use crate::push::Push;
use crate::store::Store;

/// How often the versions are read.
const POLL: Duration = Duration::from_secs(1);

/// Poll forever. The catalog compares the version with the one it was read at; the push
/// certificates are compared with the version seen on the previous poll.
pub async fn follow(store: Arc<dyn Store>, catalog: Arc<Catalog>, push: Arc<dyn Push>) {
    let mut push_certs_seen: Option<Vec<u8>> = None;
    let mut certificates: HashMap<String, String> = HashMap::new();
    loop {
        match store.shared_versions().await {
            Ok(now) => {
                refresh_catalog(&catalog, now.catalog).await;
                match &push_certs_seen {
                    Some(seen) if *seen != now.push_certs => {
                        reconnect_changed_topics(&*store, &*push, &mut certificates).await;
                    }
                    Some(_) => {}
                    None => remember_certificates(&*store, &mut certificates).await,
                }
                push_certs_seen = Some(now.push_certs);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the shared-state versions"),
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn refresh_catalog(catalog: &Catalog, version: Vec<u8>) {
    match catalog.refresh_to(version).await {
        Ok(false) => {}
        Ok(true) => {
            metrics::counter!("orchard_shared_state_reloads_total", "kind" => "catalog")
                .increment(1);
            tracing::info!("declaration catalog changed on another node; reloaded");
        }
        Err(e) => tracing::warn!(error = %e, "cannot reload the declaration catalog"),
    }
}

async fn remember_certificates(store: &dyn Store, known: &mut HashMap<String, String>) {
    if let Ok(certs) = store.push_certs().await {
        *known = certs.into_iter().map(|c| (c.topic, c.cert_pem)).collect();
    }
}

/// Reconnect every topic whose stored certificate is not the one this node last knew.
async fn reconnect_changed_topics(
    store: &dyn Store,
    push: &dyn Push,
    known: &mut HashMap<String, String>,
) {
    let certs = match store.push_certs().await {
        Ok(certs) => certs,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the push certificates");
            return;
        }
    };
    for cert in certs {
        if known.get(&cert.topic) == Some(&cert.cert_pem) {
            continue;
        }
        push.certificate_changed(&cert.topic);
        crate::telemetry::series::push_topic(&cert.topic, cert.not_after);
        metrics::counter!("orchard_shared_state_reloads_total", "kind" => "push_cert").increment(1);
        tracing::info!(topic = %cert.topic, "push certificate changed on another node");
        known.insert(cert.topic, cert.cert_pem);
    }
}
