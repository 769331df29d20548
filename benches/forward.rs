//! CPU forward throughput (tokens/s) of gpt-oss on a small config, plus the weight-memory estimates of the
//! real 20b/120b models (printed once). Run: `cargo bench --bench forward`.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gptoss_model::{init_random, memory_estimate, Config, ExpertFormat};

fn print_memory_estimates() {
    for (name, cfg) in [
        ("gpt-oss-20b", Config::gpt_oss_20b()),
        ("gpt-oss-120b", Config::gpt_oss_120b()),
    ] {
        for fmt in [ExpertFormat::Bf16, ExpertFormat::Mxfp4] {
            println!("{name}: {}", memory_estimate(&cfg, fmt));
        }
    }
}

fn forward(c: &mut Criterion) {
    print_memory_estimates();
    let cfg = Config::small();
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("forward_small_cpu");
    group.sample_size(10);
    for dtype in [DType::F32, DType::BF16] {
        let model = match init_random(&cfg, dtype, &dev, Some(0)) {
            Ok(m) => m,
            Err(e) => panic!("init failed: {e}"),
        };
        for (b, t) in [(1usize, 128usize), (4, 256)] {
            let ids: Vec<u32> = (0..b * t)
                .map(|i| (i * 7919 % cfg.vocab_size) as u32)
                .collect();
            let ids = match Tensor::from_vec(ids, (b, t), &dev) {
                Ok(x) => x,
                Err(e) => panic!("{e}"),
            };
            group.throughput(Throughput::Elements((b * t) as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{dtype:?}"), format!("{b}x{t}")),
                &ids,
                |bench, ids| bench.iter(|| model.forward(ids, None).map(|l| l.dims().to_vec())),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
