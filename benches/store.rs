//! Embedded store costs on the two hot paths: enqueueing a command for one device
//! (a durable group-committed write) and reading a device's pending queue at check-in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use orchard::store::embedded::EmbeddedStore;
use orchard::store::{Mutation, QueueEntry, Store, StoredCommand};
use tokio::runtime::Runtime;

/// Concurrent `apply` callers, like in-flight enqueue requests across actix workers.
const WRITERS: u64 = 64;
/// Devices the enqueues are spread over.
const DEVICES: u64 = 1000;
/// Pending commands in the queue read by the check-in benchmark.
const QUEUE_LENGTH: u64 = 10;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
}

fn enqueue_batch(seq: u64) -> Vec<Mutation> {
    let command_uuid = format!("bench-command-{seq}");
    vec![
        Mutation::PutCommand(StoredCommand {
            command_uuid: command_uuid.clone(),
            request_type: "DeviceInformation".to_owned(),
            body: vec![b'x'; 600],
        }),
        Mutation::PutQueueEntry {
            enrollment_id: format!("bench-device-{}", seq % DEVICES),
            entry: QueueEntry::new(seq, &command_uuid, "DeviceInformation", 0, 1_700_000_000),
        },
    ]
}

/// Apply `batches` enqueue batches from [`WRITERS`] concurrent tasks; fresh sequence
/// numbers come from `next_seq` so every batch writes new rows.
async fn enqueue_concurrently(
    store: &Arc<EmbeddedStore>,
    next_seq: &Arc<AtomicU64>,
    batches: u64,
) -> Duration {
    let remaining = Arc::new(AtomicU64::new(batches));
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, next_seq, remaining) = (
                Arc::clone(store),
                Arc::clone(next_seq),
                Arc::clone(&remaining),
            );
            tokio::spawn(async move {
                while remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        left.checked_sub(1)
                    })
                    .is_ok()
                {
                    let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                    store.apply(enqueue_batch(seq)).await.expect("apply");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer task");
    }
    started.elapsed()
}

fn store_benchmarks(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = EmbeddedStore::open(dir.path()).expect("open store");
    let runtime = runtime();

    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(1));
    let next_seq = Arc::new(AtomicU64::new(0));
    group.bench_function("apply_enqueue_concurrency_64", |b| {
        b.iter_custom(|batches| runtime.block_on(enqueue_concurrently(&store, &next_seq, batches)))
    });

    let queued: Vec<Mutation> = (0..QUEUE_LENGTH)
        .flat_map(|seq| {
            enqueue_batch(seq)
                .into_iter()
                .map(|mutation| match mutation {
                    Mutation::PutQueueEntry { entry, .. } => Mutation::PutQueueEntry {
                        enrollment_id: "bench-checkin".to_owned(),
                        entry,
                    },
                    other => other,
                })
        })
        .collect();
    runtime.block_on(store.apply(queued)).expect("fill queue");
    group.bench_function("queue_read_10_entries", |b| {
        b.iter(|| {
            runtime
                .block_on(store.queue("bench-checkin"))
                .expect("queue")
        })
    });
    group.finish();
}

criterion_group!(benches, store_benchmarks);
criterion_main!(benches);
