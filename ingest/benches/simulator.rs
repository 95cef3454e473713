//! Traffic generation: simulated records per second on one core (the simulator feeds the
//! end-to-end harness, so it must be much faster than the pipeline it measures).
//!
//! Run: `cargo bench -p meshguard-ingest --bench simulator`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_ingest::simulator::{SimConfig, Simulator};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("simulator");
    for devices in [1_000usize, 100_000] {
        let mut sim = Simulator::new(SimConfig { devices, rate: 100_000, malformed_ratio: 0.001, ..SimConfig::default() });
        let _ = sim.bootstrap();
        let mut out = Vec::with_capacity(10_000);
        group.throughput(Throughput::Elements(10_000));
        group.bench_function(format!("next_batch/devices={devices}"), |b| {
            b.iter(|| {
                out.clear();
                sim.next_batch(10_000, &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
