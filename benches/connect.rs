//! The connect hot path in process: decode the device's report, verify its identity
//! header (cached), ask its actor for the next command, encode the answer. The store is
//! the real embedded store (durable writes included where the protocol writes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use orchard::cluster::ShardMap;
use orchard::ddm::catalog::Catalog;
use orchard::device::messages::{Caller, Enqueue, HandleCheckin, HandleConnect};
use orchard::device::{DeviceSettings, Registry, UserAuthenticatePolicy};
use orchard::identity::{CertificateAuthority, IdentityVerifier};
use orchard::protocol::checkin::decode_checkin;
use orchard::protocol::connect::decode_connect;
use orchard::store::embedded::EmbeddedStore;
use orchard::store::StoredCommand;

const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn report(status: &str, command_uuid: Option<&str>) -> Vec<u8> {
    let mut dict = plist::Dictionary::new();
    dict.insert("UDID".into(), UDID.into());
    dict.insert("Status".into(), status.into());
    if let Some(uuid) = command_uuid {
        dict.insert("CommandUUID".into(), uuid.into());
    }
    let mut out = Vec::new();
    plist::Value::Dictionary(dict)
        .to_writer_xml(&mut out)
        .unwrap();
    out
}

struct Fixture {
    registry: Arc<Registry>,
    verifier: IdentityVerifier,
    header: String,
    _dir: tempfile::TempDir,
}

async fn enrolled_device() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    let identity = ca.issue_identity(UDID).unwrap();
    let verifier = IdentityVerifier::new(vec![ca.ca_cert_der().clone()]).unwrap();
    let header = format!(
        ":{}:",
        base64::engine::general_purpose::STANDARD.encode(&identity.cert_der)
    );
    let fingerprint = verifier.verify_header(&header).unwrap();
    let settings = DeviceSettings {
        repush_after: Duration::from_secs(300),
        repush_max_interval: Duration::from_secs(86_400),
        idle_timeout: Duration::from_secs(3600),
        max_resident: 1000,
        user_authenticate: UserAuthenticatePolicy::Decline,
        ddm_stall_after_secs: 120,
        retro: false,
    };
    let catalog = Arc::new(Catalog::load(store.clone()).await.unwrap());
    let placement = Arc::new(ShardMap::single_node("bench"));
    let registry = Registry::new(store, catalog, settings, placement);
    for message in [
        "nanomdm/Authenticate.2.plist",
        "nanomdm/TokenUpdate.2.plist",
    ] {
        let raw = bytes::Bytes::from(fixture(message));
        let checkin = decode_checkin(&raw).unwrap();
        let msg = HandleCheckin {
            checkin,
            raw,
            caller: Caller::Certificate(fingerprint),
        };
        registry.call(UDID, msg).await.unwrap();
    }
    Fixture {
        registry,
        verifier,
        header,
        _dir: dir,
    }
}

/// One request through the whole pipeline; returns the response body length.
async fn connect_once(fixture: &Fixture, body: &[u8]) -> usize {
    let fingerprint = fixture.verifier.verify_header(&fixture.header).unwrap();
    let report = decode_connect(body).unwrap();
    let next = fixture
        .registry
        .call(
            UDID,
            HandleConnect {
                report,
                raw: bytes::Bytes::copy_from_slice(body),
                caller: Caller::Certificate(fingerprint),
            },
        )
        .await
        .unwrap();
    next.map_or(0, |command| command.body.len())
}

fn connect(c: &mut Criterion) {
    let system = actix_rt::System::new();
    let fixture = system.block_on(enrolled_device());
    let idle = report("Idle", None);
    let mut group = c.benchmark_group("connect");
    group.throughput(Throughput::Elements(1));
    group.bench_function("idle_empty_queue", |b| {
        b.iter_custom(|iterations| {
            system.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    std::hint::black_box(connect_once(&fixture, &idle).await);
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("acknowledge_and_fetch_next_durable", |b| {
        b.iter_custom(|iterations| {
            system.block_on(async {
                let mut elapsed = Duration::ZERO;
                for n in 0..iterations {
                    let uuid = format!("BENCH-{n}");
                    let command = StoredCommand {
                        command_uuid: uuid.clone(),
                        request_type: "ProfileList".into(),
                        body: orchard::protocol::command::build_command(
                            &uuid,
                            plist::Dictionary::new(),
                        ),
                    };
                    let enqueue = Enqueue {
                        command: Arc::new(command),
                        priority: 0,
                    };
                    fixture.registry.call(UDID, enqueue).await.unwrap();
                    let ack = report("Acknowledged", Some(&uuid));
                    let started = Instant::now();
                    std::hint::black_box(connect_once(&fixture, &ack).await);
                    elapsed += started.elapsed();
                }
                elapsed
            })
        })
    });
    group.finish();
}

criterion_group!(benches, connect);
criterion_main!(benches);
