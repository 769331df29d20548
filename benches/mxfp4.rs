//! MXFP4 dequantization of one gpt-oss-20b gate_up layer on the CPU:
//! blocks `[32, 5760, 90, 16]` + scales `[32, 5760, 90]` → bf16 `[32, 2880, 5760]` (1.06 GB).
//!
//! Reported as GB/s of output, beside two ceilings measured in the same run: a plain copy of the
//! same number of bytes into a pre-faulted buffer (`memcpy`, one thread) and the same copy
//! split over all rayon threads; and beside the naive scalar reference (on 2 of the 32 experts).
//!
//! Run: `cargo bench --bench mxfp4` (needs ~2.5 GB of RAM).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gptoss_mxfp4::{dequantize_bytes, dequantize_into, dequantize_reference, Layout, Mxfp4Shape};
use half::bf16;
use rayon::prelude::*;
use std::hint::black_box;

const EXPERTS: usize = 32;
const ROWS: usize = 5760;
const GROUPS: usize = 90;

/// Deterministic pseudo-random bytes (xorshift64*), filled in parallel.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut x = (seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            for b in chunk {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                *b = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8;
            }
        });
    v
}

fn bench(c: &mut Criterion) {
    let shape = Mxfp4Shape::from_dims(&[EXPERTS, ROWS, GROUPS, 16], &[EXPERTS, ROWS, GROUPS], None)
        .unwrap();
    let blocks = random_bytes(shape.num_blocks() * 16, 1);
    // Realistic scale bytes (gpt-oss weights sit around 2^-8 .. 2^8).
    let scales: Vec<u8> = random_bytes(shape.num_blocks(), 2)
        .iter()
        .map(|b| 115 + b % 24)
        .collect();
    let n = shape.num_values();
    let out_bytes = (n * 2) as u64;
    // Pre-faulted output buffer, reused by every kernel benchmark; and a copy source.
    let mut out = vec![bf16::from_f32(1.0); n];
    let src = vec![bf16::from_f32(2.0); n];

    let mut g = c.benchmark_group("mxfp4_gate_up_layer_bf16");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(8));
    g.throughput(Throughput::Bytes(out_bytes));

    g.bench_function("copy_memcpy_1thread", |b| {
        b.iter(|| out.copy_from_slice(black_box(&src)))
    });
    g.bench_function("copy_rayon_all_threads", |b| {
        b.iter(|| {
            out.par_chunks_mut(1 << 20)
                .zip(src.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    g.bench_function("dequant_transposed_into_prefaulted", |b| {
        b.iter(|| {
            dequantize_into(
                black_box(&blocks),
                &scales,
                &shape,
                Layout::Transposed,
                &mut out,
            )
            .unwrap()
        })
    });
    g.bench_function("dequant_checkpoint_into_prefaulted", |b| {
        b.iter(|| {
            dequantize_into(
                black_box(&blocks),
                &scales,
                &shape,
                Layout::Checkpoint,
                &mut out,
            )
            .unwrap()
        })
    });
    drop(src);
    g.bench_function("dequant_transposed_new_tensor", |b| {
        b.iter(|| {
            dequantize_bytes(
                black_box(&blocks),
                &shape.blocks_dims(),
                &scales,
                &shape.scales_dims(),
                candle_core::DType::BF16,
                Layout::Transposed,
                &candle_core::Device::Cpu,
                None,
            )
            .unwrap()
        })
    });
    g.finish();
    drop(out);

    // The naive scalar version on 2 experts (1/16 of the layer), same output bytes per element.
    let small = Mxfp4Shape::from_dims(&[2, ROWS, GROUPS, 16], &[2, ROWS, GROUPS], None).unwrap();
    let sb = &blocks[..small.num_blocks() * 16];
    let ss = &scales[..small.num_blocks()];
    let mut g = c.benchmark_group("mxfp4_2_experts_bf16");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(5));
    g.throughput(Throughput::Bytes((small.num_values() * 2) as u64));
    g.bench_function("naive_scalar_reference_transposed", |b| {
        b.iter(|| {
            dequantize_reference::<bf16>(black_box(sb), ss, &small, Layout::Transposed).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
