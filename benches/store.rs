//! Store operations on 1 and 2 threads, and the store-choice comparison.
//!
//! `store/*`: webvac's store (lock-sharded open-addressing indexes, SIEVE eviction,
//! byte accounting) — get hit and miss, set, incr, append.
//! `trees/*`: a set with and without anti-entropy trees.
//! `choice/*`: the same get-hit and set workload on quick_cache (with a byte
//! weighter, its own eviction) and on dashmap (no eviction or accounting at
//! all: the floor for "dashmap plus eviction of our own").

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use webvac::store::{Arith, Mode, Store, StoreConfig, SystemClock, Write};

const KEYS: usize = 100_000;
const VALUE: [u8; 100] = [b'v'; 100];

fn key(i: usize) -> Vec<u8> {
    format!("key:{i:012}").into_bytes()
}

fn new_store() -> Store {
    Store::new(
        &StoreConfig {
            memory_limit_bytes: 256 << 20,
            item_bytes_max: 1 << 20,
            node_id: 0,
            ..StoreConfig::default()
        },
        Arc::new(SystemClock),
    )
}

/// Runs `op(thread, i)` `iters` times split over `threads` threads; returns
/// the wall time, so criterion reports time per operation across threads.
fn run_threads(threads: usize, iters: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let per = iters / threads as u64 + 1;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let op = &op;
            s.spawn(move || {
                for i in 0..per {
                    op(t, i);
                }
            });
        }
    });
    start.elapsed()
}

fn store_ops(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    let store = new_store();
    for k in &keys {
        store.write(&Write::new(Mode::Set, k, &VALUE, 0, 0));
    }
    store.write(&Write::new(Mode::Set, b"counter", b"0", 0, 0));
    let mut g = c.benchmark_group("store");
    for threads in [1usize, 2] {
        g.bench_with_input(BenchmarkId::new("get_hit", threads), &threads, |b, &t| {
            b.iter_custom(|n| {
                run_threads(t, n, |th, i| {
                    let k = &keys[(i as usize * 7919 + th * 104_729) % KEYS];
                    black_box(store.get(k, None, |e| e.value().len()));
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("get_miss", threads), &threads, |b, &t| {
            b.iter_custom(|n| {
                run_threads(t, n, |th, i| {
                    black_box(store.get(format!("miss:{th}:{i}").as_bytes(), None, |e| {
                        e.value().len()
                    }));
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("set", threads), &threads, |b, &t| {
            b.iter_custom(|n| {
                run_threads(t, n, |th, i| {
                    let k = &keys[(i as usize * 7919 + th * 104_729) % KEYS];
                    black_box(store.write(&Write::new(Mode::Set, k, &VALUE, 0, 0)));
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("incr", threads), &threads, |b, &t| {
            b.iter_custom(|n| {
                run_threads(t, n, |_, _| {
                    black_box(store.arith(&Arith {
                        key: b"counter",
                        incr: true,
                        delta: 1,
                        compare_cas: None,
                    }));
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("append", threads), &threads, |b, &t| {
            b.iter_custom(|n| {
                run_threads(t, n, |th, i| {
                    // Reset now and then so values stay small.
                    let k = &keys[(i as usize % 1000) + th * 1000];
                    if i % 64 == 0 {
                        store.write(&Write::new(Mode::Set, k, b"", 0, 0));
                    }
                    black_box(store.write(&Write::new(Mode::Append, k, b"abcd", 0, 0)));
                })
            })
        });
    }
    g.finish();
}

/// What keeping anti-entropy trees adds to a write: the same set, with and
/// without trees over 1,024 partitions.
fn trees(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    let mut g = c.benchmark_group("trees");
    for (name, partitions) in [("set_without_trees", None), ("set_with_trees", Some(1024))] {
        let store = Store::new(
            &StoreConfig {
                memory_limit_bytes: 256 << 20,
                item_bytes_max: 1 << 20,
                tree_partitions: partitions,
                ..StoreConfig::default()
            },
            Arc::new(SystemClock),
        );
        for k in &keys {
            store.write(&Write::new(Mode::Set, k, &VALUE, 0, 0));
        }
        g.bench_function(name, |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 7919) % KEYS;
                black_box(store.write(&Write::new(Mode::Set, &keys[i], &VALUE, 0, 0)))
            })
        });
    }
    g.finish();
}

fn choice(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    let ours = new_store();
    let qc: quick_cache::sync::Cache<Vec<u8>, Arc<[u8]>, ByteWeighter> =
        quick_cache::sync::Cache::with_weighter(KEYS * 2, 256 << 20, ByteWeighter);
    let dm: dashmap::DashMap<Vec<u8>, Box<[u8]>> = dashmap::DashMap::new();
    for k in &keys {
        ours.write(&Write::new(Mode::Set, k, &VALUE, 0, 0));
        qc.insert(k.clone(), Arc::from(&VALUE[..]));
        dm.insert(k.clone(), Box::from(&VALUE[..]));
    }
    let mut g = c.benchmark_group("choice");
    for threads in [1usize, 2] {
        let pick = |th: usize, i: u64| (i as usize * 7919 + th * 104_729) % KEYS;
        g.bench_with_input(
            BenchmarkId::new("webvac_get", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|n| {
                    run_threads(t, n, |th, i| {
                        let mut out = [0u8; 128];
                        black_box(ours.get(&keys[pick(th, i)], None, |e| {
                            out[..e.value().len()].copy_from_slice(e.value())
                        }));
                    })
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("quick_cache_get", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|n| {
                    run_threads(t, n, |th, i| {
                        let mut out = [0u8; 128];
                        if let Some(v) = qc.get(&keys[pick(th, i)]) {
                            out[..v.len()].copy_from_slice(&v);
                        }
                        black_box(out);
                    })
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("dashmap_get", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|n| {
                    run_threads(t, n, |th, i| {
                        let mut out = [0u8; 128];
                        if let Some(v) = dm.get(&keys[pick(th, i)]) {
                            out[..v.len()].copy_from_slice(&v);
                        }
                        black_box(out);
                    })
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("webvac_set", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|n| {
                    run_threads(t, n, |th, i| {
                        black_box(ours.write(&Write::new(
                            Mode::Set,
                            &keys[pick(th, i)],
                            &VALUE,
                            0,
                            0,
                        )));
                    })
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("quick_cache_set", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|n| {
                    run_threads(t, n, |th, i| {
                        qc.insert(keys[pick(th, i)].clone(), Arc::from(&VALUE[..]));
                    })
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("dashmap_set", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|n| {
                    run_threads(t, n, |th, i| {
                        dm.insert(keys[pick(th, i)].clone(), Box::from(&VALUE[..]));
                    })
                })
            },
        );
    }
    g.finish();
}

#[derive(Clone)]
struct ByteWeighter;

impl quick_cache::Weighter<Vec<u8>, Arc<[u8]>> for ByteWeighter {
    fn weight(&self, k: &Vec<u8>, v: &Arc<[u8]>) -> u64 {
        (k.len() + v.len() + 64) as u64
    }
}

criterion_group! {
    name = store_benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = store_ops, trees, choice
}
criterion_main!(store_benches);
