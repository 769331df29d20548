//! The CUDA fused LM-head loss (one NVRTC kernel per chunk) against the CPU path, which the unit
//! tests of `lm_loss.rs` check against autograd. Needs a CUDA device (run on the GPU machine).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor};
use gptoss_sft::trainer::lm_loss::{fused_lm_head_loss, FusedLmLoss};

/// Value every element of the "tie" hidden row and of the two tied weight rows is set to.
const TIE_H: f32 = 0.5;
const TIE_W: f32 = 1.0;

/// Random `hidden [n, h]` (N(0, 1)) and `weight [v, h]` (N(0, 0.5)), on the CPU in f32, with
/// hidden row 0 all `TIE_H` and weight rows `tie.0`, `tie.1` all `TIE_W`: row 0's logits at
/// those two ids are exactly `h · TIE_H · TIE_W` (exact in f32 and bf16, in any summation order)
/// and far above every other logit of the row (std ≈ 2), so the argmax of row 0 is a tie.
fn inputs(n: usize, h: usize, v: usize, tie: (usize, usize)) -> Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let mut hid = Tensor::randn(0f32, 1.0, (n, h), &dev)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    hid[..h].fill(TIE_H);
    let mut w = Tensor::randn(0f32, 0.5, (v, h), &dev)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    w[tie.0 * h..(tie.0 + 1) * h].fill(TIE_W);
    w[tie.1 * h..(tie.1 + 1) * h].fill(TIE_W);
    Ok((
        Tensor::from_vec(hid, (n, h), &dev)?,
        Tensor::from_vec(w, (v, h), &dev)?,
    ))
}

/// Targets: row 0 the first tied id, row 1 id 0, row 2 id V − 1; from row 3 on, even rows the
/// argmax of their CPU logits in `dtype` (candle's `argmax`, so that `correct` counts are not all
/// zero), odd rows spread ids.
fn targets(
    hidden: &Tensor,
    weight: &Tensor,
    tie: (usize, usize),
    dtype: DType,
) -> Result<Vec<u32>> {
    let (n, _) = hidden.dims2()?;
    let (v, _) = weight.dims2()?;
    let arg = hidden
        .to_dtype(dtype)?
        .matmul(&weight.to_dtype(dtype)?.t()?)?
        .to_dtype(DType::F32)?
        .argmax(1)?
        .to_vec1::<u32>()?;
    Ok((0..n)
        .map(|i| match i {
            0 => tie.0 as u32,
            1 => 0,
            2 => (v - 1) as u32,
            _ if i % 2 == 0 => arg[i],
            _ => ((i * 7919 + 13) % v) as u32,
        })
        .collect())
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()
}

struct Tol {
    /// Relative, on nll_sum and entropy_sum.
    sums: f64,
    /// Max |Δgrad| relative to max |grad|.
    grad: f32,
    /// Rows whose `correct` may differ (argmax near-ties after different roundings).
    correct: usize,
}

fn compare(label: &str, cpu: &FusedLmLoss, gpu: &FusedLmLoss, tol: &Tol) -> Result<()> {
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let nll = rel(gpu.nll_sum, cpu.nll_sum);
    let ent = rel(gpu.entropy_sum, cpu.entropy_sum);
    let g_cpu = &cpu.grad_hidden;
    let g_gpu = gpu.grad_hidden.to_device(&Device::Cpu)?;
    assert_eq!(g_gpu.dims(), g_cpu.dims(), "{label}: grad shape");
    assert_eq!(g_gpu.dtype(), g_cpu.dtype(), "{label}: grad dtype");
    let scale = max_abs(g_cpu)?;
    let diff = max_abs(&(g_gpu.to_dtype(DType::F32)? - g_cpu.to_dtype(DType::F32)?)?)?;
    println!(
        "{label}: nll_sum cpu {:.6} gpu {:.6} (rel {nll:.2e}); entropy_sum cpu {:.6} gpu {:.6} \
         (rel {ent:.2e}); correct cpu {} gpu {} of {}; grad max|Δ| {diff:.3e} (max|g| {scale:.3e})",
        cpu.nll_sum,
        gpu.nll_sum,
        cpu.entropy_sum,
        gpu.entropy_sum,
        cpu.correct,
        gpu.correct,
        cpu.count
    );
    assert_eq!(gpu.count, cpu.count, "{label}: count");
    assert!(nll <= tol.sums, "{label}: nll_sum rel diff {nll:.3e}");
    assert!(ent <= tol.sums, "{label}: entropy_sum rel diff {ent:.3e}");
    assert!(
        gpu.correct.abs_diff(cpu.correct) <= tol.correct,
        "{label}: correct cpu {} gpu {}",
        cpu.correct,
        gpu.correct
    );
    assert!(
        diff <= tol.grad * scale,
        "{label}: grad max abs diff {diff:.3e} vs max |g| {scale:.3e}"
    );
    Ok(())
}

/// f32: logits agree to ~1e-6 (cuBLAS f32 vs the CPU sgemm), so sums agree to ~1e-6 and the
/// argmax is the same. bf16: the two matmuls round the logits to bf16 after summing in
/// different orders, so single logits may differ by one bf16 ulp (2⁻⁸ relative, ~0.02 at |x| ≈ 4):
/// per-row nll moves by up to that, which over many rows averages out well below 2e-2 of the sum;
/// the gradient goes through bf16 twice (logits gradient, matmul output): 2e-2 of max |g|; a
/// near-tie argmax may flip for a row or two.
fn tol(dtype: DType) -> Tol {
    match dtype {
        DType::F32 => Tol {
            sums: 1e-4,
            grad: 1e-4,
            correct: 0,
        },
        _ => Tol {
            sums: 2e-2,
            grad: 2e-2,
            correct: 2,
        },
    }
}

fn run_case(n: usize, h: usize, v: usize, chunks: &[usize]) -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let tie = (v / 3, v / 3 + 1 + v / 5);
    let (hid, w) = inputs(n, h, v, tie)?;
    let scale = 0.37;
    for dtype in [DType::F32, DType::BF16] {
        let t = targets(&hid, &w, tie, dtype)?;
        let (hc, wc) = (hid.to_dtype(dtype)?, w.to_dtype(dtype)?);
        let (hg, wg) = (hc.to_device(&gpu)?, wc.to_device(&gpu)?);
        let want = fused_lm_head_loss(&hc, &wc, &t, scale, 16)?;
        // Row 0 (first tied id) and the argmax rows are correct on the CPU.
        let argmax_rows = (3..n).filter(|i| i % 2 == 0).count();
        assert!(
            want.correct > argmax_rows,
            "{dtype:?}: CPU correct {} of the {} argmax targets",
            want.correct,
            argmax_rows + 1
        );
        for &chunk in chunks {
            let got = fused_lm_head_loss(&hg, &wg, &t, scale, chunk)?;
            compare(
                &format!("N={n} H={h} V={v} {dtype:?} chunk {chunk}"),
                &want,
                &got,
                &tol(dtype),
            )?;
        }
        // Row 0 alone: the tied maximum at ids tie.0 < tie.1 — the first one is the argmax
        // (torch.argmax, and the CPU path), exactly in both dtypes.
        let row0 = hg.narrow(0, 0, 1)?;
        for (target, correct) in [(tie.0, 1), (tie.1, 0), (0, 0)] {
            let got = fused_lm_head_loss(&row0, &wg, &[target as u32], scale, 4)?;
            let cpu = fused_lm_head_loss(&hc.narrow(0, 0, 1)?, &wc, &[target as u32], scale, 4)?;
            assert_eq!(
                (got.correct, cpu.correct),
                (correct, correct),
                "{dtype:?} V={v}: tie row, target {target}"
            );
            // Two equal logits hold ~all the mass: nll ≈ ln 2 at a tied id.
            if target != 0 {
                assert!(
                    (got.nll_sum - std::f64::consts::LN_2).abs() < 1e-3,
                    "{dtype:?}: tie row nll {}",
                    got.nll_sum
                );
            }
        }
    }
    Ok(())
}

/// V odd: rows after the first start off 16-byte alignment (scalar head, vectors, scalar tail).
#[test]
fn cuda_matches_cpu_v50001() -> Result<()> {
    run_case(37, 64, 50_001, &[5, 16, 37, 64])
}

/// V smaller than one 16-byte vector of bf16 and not a multiple of 4 (f32 vectors).
#[test]
fn cuda_matches_cpu_tiny_vocab() -> Result<()> {
    run_case(9, 64, 11, &[2, 9])
}

#[test]
fn cuda_matches_cpu_gpt_oss_vocab() -> Result<()> {
    run_case(8, 64, 201_088, &[3, 8])
}

/// Timing at gpt-oss shapes (H = 2880, V = 201,088, bf16, chunk 1024): the whole call against its
/// two matmuls alone, so the difference is the softmax kernel (plus the per-chunk stats copy).
/// `cargo test ... -- --ignored --nocapture`.
#[test]
#[ignore]
fn cuda_timing_gpt_oss_shapes() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let (n, h, v, chunk) = (2048, 2880, 201_088, 1024);
    let hid = Tensor::randn(0f32, 1.0, (n, h), &gpu)?.to_dtype(DType::BF16)?;
    let w = Tensor::randn(0f32, 0.02, (v, h), &gpu)?.to_dtype(DType::BF16)?;
    let t: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
    // Best of 20 synchronized runs, in ms.
    let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..20 {
            gpu.synchronize()?;
            let start = std::time::Instant::now();
            f()?;
            gpu.synchronize()?;
            best = best.min(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok(best)
    };
    let fused = time(&|| fused_lm_head_loss(&hid, &w, &t, 1.0, chunk).map(|_| ()))?;
    let matmuls = time(&|| {
        for c in 0..n / chunk {
            let logits = hid.narrow(0, c * chunk, chunk)?.matmul(&w.t()?)?;
            logits.matmul(&w)?;
        }
        Ok(())
    })?;
    println!(
        "N={n} H={h} V={v} bf16 chunk {chunk}: fused_lm_head_loss {fused:.2} ms, its two matmuls \
         {matmuls:.2} ms, difference {:.2} ms",
        fused - matmuls
    );
    Ok(())
}
