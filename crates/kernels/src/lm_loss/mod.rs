//! The row statistics and gradient of the fused LM-head cross-entropy: for each `[V]` logits row
//! and its target, `−log p(target)`, the entropy and whether the argmax is the target, with the
//! row overwritten by `scale · (softmax − onehot(target))` (the gradient of the scaled NLL with
//! respect to the logits). The LM head's matmuls around it live in `gptoss-sft`'s
//! `fused_lm_head_loss`; this module is the part that reads every logit.
//!
//! Three implementations with the same outputs: [`softmax_row`] (the CPU reference, vectorized by
//! [`fastmath`]) over rayon rows, candle ops (devices without a kernel), and one CUDA kernel per
//! chunk that overwrites the logits in place (`cuda.rs`).

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod fastmath;

use candle_core::{DType, Device, Result, Tensor, D};
use rayon::prelude::*;

/// Row statistics of one logits row.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowStats {
    /// `−log p(target)`.
    pub nll: f64,
    /// Entropy of the row's distribution (nats).
    pub entropy: f64,
    /// Whether the first argmax is the target.
    pub correct: bool,
}

/// One logits row → its statistics, with the row replaced by `scale · (softmax − onehot(t))`.
pub fn softmax_row(row: &mut [f32], t: usize, scale: f64) -> RowStats {
    let max = fastmath::max(row);
    let arg = row.iter().position(|&x| x == max).unwrap_or(0);
    let target_shifted = (row[t] - max) as f64;
    let (sum, dot) = fastmath::exp_shifted_sums(row, max);
    let log_sum = sum.ln();
    let inv = 1.0 / sum;
    let k = (inv * scale) as f32;
    for x in row.iter_mut() {
        *x *= k;
    }
    row[t] -= scale as f32;
    RowStats {
        nll: log_sum - target_shifted,
        entropy: log_sum - dot * inv,
        correct: arg == t,
    }
}

/// Row statistics and `scale · (softmax − onehot)` of one `[c, V]` logits chunk (weight dtype),
/// dispatched by device: the CUDA kernel (f32/bf16, gradient written over the logits, in their
/// dtype), the CPU rows ([`softmax_stats_cpu`]) or candle ops ([`softmax_stats_generic`]); the
/// latter two take the logits to f32 first (transformers' `logits.float()`).
pub fn softmax_stats(
    logits: Tensor,
    targets: &[u32],
    scale: f64,
) -> Result<(Vec<RowStats>, Tensor)> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && cuda::supports(logits.dtype()) {
        let stats = cuda::softmax_stats_in_place(&logits, targets, scale)?;
        return Ok((stats, logits));
    }
    let logits = logits.to_dtype(DType::F32)?;
    if logits.device().is_cpu() {
        softmax_stats_cpu(&logits, targets, scale)
    } else {
        softmax_stats_generic(&logits, targets, scale)
    }
}

/// CPU path for other dtypes: one rayon pass per row ([`softmax_row`]): max, log-sum-exp, target
/// log-prob, argmax, entropy and `scale · (softmax − onehot)`. `logits`: `[c, V]` f32 on the CPU.
fn softmax_stats_cpu(
    logits: &Tensor,
    targets: &[u32],
    scale: f64,
) -> Result<(Vec<RowStats>, Tensor)> {
    let (c, v) = logits.dims2()?;
    let mut data = logits.flatten_all()?.to_vec1::<f32>()?;
    let stats: Vec<RowStats> = data
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| softmax_row(row, t as usize, scale))
        .collect();
    let grad = Tensor::from_vec(data, (c, v), &Device::Cpu)?;
    Ok((stats, grad))
}

/// Device-generic path with candle ops (off the CPU where no kernel applies: metal, or f16 logits
/// on CUDA). Same outputs as [`softmax_stats_cpu`]. `logits`: `[c, V]` f32.
fn softmax_stats_generic(
    logits: &Tensor,
    targets: &[u32],
    scale: f64,
) -> Result<(Vec<RowStats>, Tensor)> {
    let (c, v) = logits.dims2()?;
    let dev = logits.device();
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let e = shifted.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let p = e.broadcast_div(&sum)?;
    let log_sum = sum.log()?;
    let t = Tensor::from_slice(targets, (c, 1), dev)?;
    let target_shifted = shifted.gather(&t, D::Minus1)?;
    let nll = (&log_sum - &target_shifted)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let entropy = (&log_sum - (&p * &shifted)?.sum_keepdim(D::Minus1)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let arg = logits
        .argmax_keepdim(D::Minus1)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let onehot = Tensor::zeros((c, v), DType::F32, dev)?.scatter_add(
        &t,
        &Tensor::ones((c, 1), DType::F32, dev)?,
        D::Minus1,
    )?;
    let grad = ((p - onehot)? * scale)?;
    let stats = (0..c)
        .map(|i| RowStats {
            nll: nll[i] as f64,
            entropy: entropy[i] as f64,
            correct: arg[i] == targets[i],
        })
        .collect();
    Ok((stats, grad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_rows_equal_the_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (7, 16), &dev)?;
        let w = Tensor::randn(0f32, 0.5, (50, 16), &dev)?;
        let t = [3u32, 0, 49, 7, 7, 12, 30];
        let logits = h.matmul(&w.t()?)?;
        let (s1, g1) = softmax_stats_cpu(&logits, &t, 0.25)?;
        let (s2, g2) = softmax_stats_generic(&logits, &t, 0.25)?;
        for (a, b) in s1.iter().zip(&s2) {
            assert!((a.nll - b.nll).abs() < 1e-4 && (a.entropy - b.entropy).abs() < 1e-4);
            assert_eq!(a.correct, b.correct);
        }
        let diff = (g1 - g2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        Ok(())
    }
}
