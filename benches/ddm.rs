//! DDM hot paths: the `tokens` and `declaration-items` responses every device
//! requests on every sync, and ingesting a status report.
//!
//! Targets: `tokens` ≤ 1 µs per response with 1,000,000 enrollments spread
//! over 1,000 declaration-set combinations; `declaration-items` ≤ 10 µs for a
//! 50-declaration manifest; status ingest (parse + merge) ≤ 50 µs for a
//! 10-declaration report.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use orchard::ddm::{Declaration, EnrollmentStatus, Manifest, StatusReport};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;
use time::OffsetDateTime;

const ENROLLMENTS: usize = 1_000_000;
const COMBINATIONS: usize = 1_000;
const POOL_SIZE: usize = 200;
const DECLARATIONS_PER_COMBINATION: usize = 20;

fn declaration(value: serde_json::Value) -> Declaration {
    let bytes = serde_json::to_vec(&value).expect("serializable declaration");
    Declaration::from_api_json(&bytes, 0)
        .expect("valid declaration")
        .0
}

fn configuration(index: usize) -> Declaration {
    declaration(json!({
        "Type": "com.apple.configuration.management.test",
        "Identifier": format!("com.example.cfg.{index}"),
        "Payload": {"Echo": format!("configuration {index}")}
    }))
}

fn activation(identifier: &str, configurations: &[&Declaration]) -> Declaration {
    let listed: Vec<&str> = configurations
        .iter()
        .map(|configuration| configuration.identifier.as_str())
        .collect();
    declaration(json!({
        "Type": "com.apple.activation.simple",
        "Identifier": identifier,
        "Payload": {"StandardConfigurations": listed}
    }))
}

/// A manifest of `size` declarations: one activation over `size - 1` configurations.
fn manifest_from_pool(pool: &[Declaration], size: usize, name: &str, rng: &mut StdRng) -> Manifest {
    let chosen: Vec<&Declaration> = pool.choose_multiple(rng, size - 1).collect();
    let activation = activation(name, &chosen);
    Manifest::new(chosen.into_iter().chain([&activation]))
}

fn tokens(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let pool: Vec<Declaration> = (0..POOL_SIZE).map(configuration).collect();
    let manifests: Vec<Manifest> = (0..COMBINATIONS)
        .map(|index| {
            manifest_from_pool(
                &pool,
                DECLARATIONS_PER_COMBINATION,
                &format!("com.example.act.{index}"),
                &mut rng,
            )
        })
        .collect();
    let mut combination_of: Vec<u16> = (0..ENROLLMENTS)
        .map(|enrollment| (enrollment % COMBINATIONS) as u16)
        .collect();
    combination_of.shuffle(&mut rng);

    let mut request = 0usize;
    c.bench_function("tokens (1M enrollments, 1000 combinations)", |b| {
        b.iter(|| {
            // A large odd stride visits enrollments in a cache-unfriendly order.
            request = (request + 7_919) % ENROLLMENTS;
            let manifest = &manifests[usize::from(combination_of[request])];
            black_box(manifest.tokens_json(OffsetDateTime::now_utc()))
        })
    });
}

fn declaration_items(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(11);
    let pool: Vec<Declaration> = (0..POOL_SIZE).map(configuration).collect();
    let manifest = manifest_from_pool(&pool, 50, "com.example.act.items", &mut rng);
    assert_eq!(manifest.len(), 50);
    c.bench_function("declaration-items (50 declarations)", |b| {
        b.iter(|| black_box(manifest.items_json()))
    });

    let chosen: Vec<&Declaration> = pool.iter().take(50).collect();
    c.bench_function("manifest build (50 declarations)", |b| {
        b.iter(|| black_box(Manifest::new(chosen.iter().copied())))
    });
}

fn status_report_json() -> Vec<u8> {
    let entry = |index: usize, valid: &str| {
        json!({
            "identifier": format!("com.example.cfg.{index}"),
            "server-token": format!("{index:032x}"),
            "active": true,
            "valid": valid
        })
    };
    let configurations: Vec<serde_json::Value> = (0..8)
        .map(|index| entry(index, if index == 3 { "invalid" } else { "valid" }))
        .collect();
    let report = json!({
        "StatusItems": {
            "management": {
                "declarations": {
                    "activations": [entry(100, "valid")],
                    "configurations": configurations,
                    "assets": [],
                    "management": [{"identifier": "com.example.org", "server-token": "ab", "active": false, "valid": "valid"}]
                }
            },
            "device": {
                "model": {"family": "iPhone", "identifier": "iPhone15,2", "marketing-name": "iPhone 14 Pro"},
                "operating-system": {"family": "iOS", "version": "18.1", "build-version": "22B83"}
            },
            "passcode": {"is-present": true, "is-compliant": true}
        },
        "Errors": []
    });
    serde_json::to_vec(&report).expect("serializable report")
}

fn status_ingest(c: &mut Criterion) {
    let body = status_report_json();
    let mut status = EnrollmentStatus::default();
    let mut received_at = 1_700_000_000i64;
    c.bench_function("status ingest (10 declarations)", |b| {
        b.iter(|| {
            let report = StatusReport::parse(black_box(&body)).expect("valid report");
            received_at += 1;
            status.apply(&report, received_at);
        })
    });
    assert_eq!(status.declarations.len(), 10);
}

criterion_group!(benches, tokens, declaration_items, status_ingest);
criterion_main!(benches);
