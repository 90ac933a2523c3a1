//! One million distinct device tokens pushed through the APNs engine into the local APNs
//! peer running in the same process (so the 2 cores are shared, as in production with a
//! busy server). Reports pushes/s, connections used and peak memory.
//!
//!   cargo bench --bench push            # ORCHARD_BENCH_PUSHES=N to change the count

use std::sync::Arc;
use std::time::Instant;

use apns_peer::{ApnsPeer, PeerConfig};
use orchard::push::apns::{ApnsPush, ApnsSettings, Endpoint};
use orchard::push::{Push, PushTarget};
use orchard::store::embedded::EmbeddedStore;
use orchard::store::{Mutation, PushCertRecord, Store};
use rustls::pki_types::pem::PemObject;

const TOPIC: &str = "com.apple.mgmt.External.bench";
const BATCH: usize = 100_000;

fn push_certificate() -> (String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]),
        TOPIC,
    );
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn target(n: u64) -> PushTarget {
    let mut token = [0u8; 32];
    token[..8].copy_from_slice(&n.to_be_bytes());
    PushTarget {
        enrollment_id: format!("device-{n}"),
        topic: TOPIC.to_string(),
        token: token.to_vec(),
        push_magic: format!("magic-{n}"),
    }
}

fn main() {
    let total: u64 = std::env::var("ORCHARD_BENCH_PUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let connections: usize = std::env::var("ORCHARD_BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let (cert_pem, key_pem) = push_certificate();
    let peer_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let peer = peer_runtime
        .block_on(ApnsPeer::start(PeerConfig {
            trusted_client_certs: vec![rustls::pki_types::CertificateDer::from_pem_slice(
                cert_pem.as_bytes(),
            )
            .unwrap()],
            ..PeerConfig::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open(dir.path()).unwrap();
    let client_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client_runtime
        .block_on(store.apply(vec![Mutation::PutPushCert(PushCertRecord {
            topic: TOPIC.into(),
            cert_pem,
            key_pem,
            not_after: i64::MAX,
            uploaded_at: 0,
        })]))
        .unwrap();
    let mut settings = ApnsSettings::new(Endpoint::parse(&peer.url()).unwrap());
    settings.extra_roots = vec![peer.ca_der()];
    settings.connections_per_topic = connections;
    let push = ApnsPush::start(settings, store).unwrap();

    let started = Instant::now();
    let mut sent = 0usize;
    let mut next = 0u64;
    while next < total {
        let batch: Vec<PushTarget> = (next..(next + BATCH as u64).min(total))
            .map(target)
            .collect();
        next += batch.len() as u64;
        let outcomes = client_runtime.block_on(push.push(&batch));
        sent += outcomes.iter().filter(|o| o.is_sent()).count();
        eprint!(
            "\r{next}/{total} pushed, {:.0}/s",
            next as f64 / started.elapsed().as_secs_f64()
        );
    }
    let elapsed = started.elapsed();
    eprintln!();
    println!("pushes:            {total}");
    println!(
        "accepted by peer:  {sent} (peer counted {})",
        peer.push_count()
    );
    println!("elapsed:           {:.2} s", elapsed.as_secs_f64());
    println!(
        "throughput:        {:.0} pushes/s",
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "connections used:  {} (configured {connections})",
        peer.connections_accepted()
    );
    println!(
        "peak RSS:          {} MiB (engine, store and peer in one process)",
        peak_rss_kib() / 1024
    );
    assert_eq!(sent as u64, total, "every push was accepted");
}
