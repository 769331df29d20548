//! Long-context sizes on the GPU: a kernel whose operand has more than 2^31 elements (the routed
//! SwiGLU of 131,072 tokens × top-4 at the 20b width), and flash attention over 131,072 tokens
//! with a sliding window and packed documents, each checked on rows near the end against the CPU
//! (64-bit indexing: a 32-bit product would land those rows elsewhere). Needs ~30 GiB of GPU memory.

use candle_core::{DType, Device, Result, Tensor, Var};
use gptoss_kernels::attention::{sink_attention, KeyMask};
use gptoss_kernels::moe::swiglu_bias;

use super::max_abs;

/// `max |a − b| / max |b|` (bf16 outputs: one rounding step of the largest value).
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .to_dtype(DType::F32)
        .and_then(|x| x.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap_or(f32::NAN);
    max_abs(a, b) / scale.max(1e-6)
}

/// `swiglu_bias` on `[M, 5760]` bf16 with M·5760 > 2^31, forward and backward: the first and
/// last rows against the CPU op on the same rows.
#[test]
fn cuda_swiglu_past_2_pow_31_elements() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let cpu = Device::Cpu;
    let (i, e) = (2880usize, 32usize);
    let m = (1usize << 31) / (2 * i) + 64; // 372,892 rows: 2,147,857,920 elements
    assert!(m * 2 * i > 1 << 31);
    let gu =
        Var::from_tensor(&(Tensor::randn(0f32, 4.0, (m, 2 * i), &gpu)?.to_dtype(DType::BF16)?))?;
    let bias = Tensor::randn(0f32, 1.0, (e, 2 * i), &gpu)?.to_dtype(DType::BF16)?;
    let re: Vec<u32> = (0..m as u32).map(|r| (r * 7) % e as u32).collect();
    let re_g = Tensor::new(re.as_slice(), &gpu)?;
    let out = swiglu_bias(gu.as_tensor(), &bias, &re_g, 7.0, 1.702)?;
    let grads = out.to_dtype(DType::F32)?.sum_all()?.backward()?;
    let Some(dgu) = grads.get(gu.as_tensor()) else {
        panic!("no gradient for gu")
    };
    for r0 in [0, m - 8] {
        let gc = Var::from_tensor(&gu.as_tensor().narrow(0, r0, 8)?.to_device(&cpu)?)?;
        let rc = Tensor::new(&re[r0..r0 + 8], &cpu)?;
        let want = swiglu_bias(gc.as_tensor(), &bias.to_device(&cpu)?, &rc, 7.0, 1.702)?;
        let got = out.narrow(0, r0, 8)?.to_device(&cpu)?;
        let d = rel(&got, &want);
        assert!(
            d <= 1.6e-2,
            "rows {r0}..{}: output differs by {d} (relative)",
            r0 + 8
        );
        let gw = want.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let Some(gwant) = gw.get(gc.as_tensor()) else {
            panic!("no CPU gradient")
        };
        let dd = rel(&dgu.narrow(0, r0, 8)?.to_device(&cpu)?, gwant);
        assert!(
            dd <= 1.6e-2,
            "rows {r0}..{}: gradient differs by {dd} (relative)",
            r0 + 8
        );
    }
    Ok(())
}

/// Rows `r0..r0 + n` of head `h` of `x` `[1, heads, T, d]`, flattened to f32 on the host.
fn host_rows(x: &Tensor, h: usize, r0: usize, n: usize) -> Result<Vec<f32>> {
    x.narrow(1, h, 1)?
        .narrow(2, r0, n)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1()
}

/// Flash attention (bf16, 64 heads over 8, d 64) at T = 131,072: sliding window 128 and full
/// causal attention over three packed documents; rows near the end and at a document start against
/// an f64 CPU evaluation over all keys; the backward runs and stays finite.
#[test]
fn cuda_flash_attention_at_131072_tokens() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let cpu = Device::Cpu;
    let (t, nh, nkv, d) = (131_072usize, 64usize, 8usize, 64usize);
    let bf = |dims: (usize, usize, usize, usize)| -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, dims, &gpu)?.to_dtype(DType::BF16)
    };
    let (q, k, v) = (bf((1, nh, t, d))?, bf((1, nkv, t, d))?, bf((1, nkv, t, d))?);
    let sinks = Tensor::randn(0f32, 1.0, nh, &gpu)?;
    let cuts = [0usize, 50_000, 100_001];
    let start = |j: usize| cuts.iter().copied().filter(|&c| c <= j).max().unwrap_or(0);
    let ds: Vec<u32> = (0..t).map(|j| start(j) as u32).collect();
    let doc_start = Tensor::from_vec(ds, (1, t), &gpu)?;
    let scale = 0.125;
    for window in [Some(128usize), None] {
        let mask = KeyMask {
            window,
            key_valid: None,
            doc_start: Some(doc_start.clone()),
        };
        let (qv, kv, vv) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        let out = sink_attention(
            qv.as_tensor(),
            kv.as_tensor(),
            vv.as_tensor(),
            Some(&mask),
            &sinks,
            scale,
        )?;
        for (row, h) in [
            (t - 1, 63),
            (t - 2, 0),
            (100_001, 17),
            (100_003, 40),
            (49_999, 9),
        ] {
            let hk = h / (nh / nkv);
            let qr = host_rows(&q, h, row, 1)?;
            let j0 = match window {
                Some(w) => (row + 1).saturating_sub(w).max(start(row)),
                None => start(row),
            };
            let n = row + 1 - j0;
            let (kr, vr) = (host_rows(&k, hk, j0, n)?, host_rows(&v, hk, j0, n)?);
            let sink = sinks.to_device(&cpu)?.to_vec1::<f32>()?[h] as f64;
            let s: Vec<f64> = (0..n)
                .map(|j| (0..d).map(|c| (qr[c] * kr[j * d + c]) as f64).sum::<f64>() * scale)
                .collect();
            let mx = s.iter().copied().fold(sink, f64::max);
            let den = s.iter().map(|x| (x - mx).exp()).sum::<f64>() + (sink - mx).exp();
            let want: Vec<f32> = (0..d)
                .map(|c| {
                    (0..n)
                        .map(|j| (s[j] - mx).exp() / den * vr[j * d + c] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            let got = host_rows(&out, h, row, 1)?;
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 2e-2,
                "window {window:?} row {row} head {h}: differs by {diff}"
            );
        }
        let go = Tensor::randn(0f32, 1.0, (1, nh, t, d), &gpu)?;
        let grads = (out.to_dtype(DType::F32)? * go)?.sum_all()?.backward()?;
        for (name, x) in [("q", &qv), ("k", &kv), ("v", &vv)] {
            let Some(g) = grads.get(x.as_tensor()) else {
                panic!("no gradient for {name}")
            };
            let s = g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert!(
                s.is_finite() && s > 0.0,
                "window {window:?}: d{name} sum of squares {s}"
            );
        }
    }
    Ok(())
}
