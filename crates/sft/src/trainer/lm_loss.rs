//! Fused LM-head cross-entropy at the labelled positions only (TRL 1.16's "fused LM head" loss).
//!
//! The LM head is frozen during LoRA training, so the gradient of the loss with respect to the
//! final hidden states has a closed form: `∂L/∂h = scale · (softmax(h·Wᵀ) − onehot(target)) · W`.
//! We compute it chunk by chunk, so the `[N, V]` logits (V = 201,088 for gpt-oss) never live in
//! an autograd graph and at most `chunk_rows × V` logits exist at once. The caller feeds the
//! gradient back into the graph through the surrogate `Σ h · ∂L/∂h` (see [`super::backward`]).
//!
//! The per-row statistics follow TRL: `mean_token_accuracy` (argmax == label) and `entropy`
//! (nats, of the full next-token distribution), both over labelled positions.

use candle_core::{DType, Device, Result, Storage, Tensor};
use gptoss_kernels::lm_loss::{softmax_row, softmax_stats, RowStats};
use std::sync::Mutex;

use rayon::prelude::*;

/// Result of [`fused_lm_head_loss`] for one micro-batch.
#[derive(Debug, Clone)]
pub struct FusedLmLoss {
    /// `Σ −log p(target)` over the rows (f64, unscaled).
    pub nll_sum: f64,
    /// Rows whose argmax equals the target.
    pub correct: usize,
    /// `Σ entropy` over the rows (nats).
    pub entropy_sum: f64,
    /// Number of rows (labelled positions).
    pub count: usize,
    /// `grad_scale · ∂(Σ nll)/∂hidden`, `[N, H]`, dtype and device of `hidden`.
    pub grad_hidden: Tensor,
}

/// Cross-entropy of `hidden · weightᵀ` against `targets`, with the gradient w.r.t. `hidden`.
///
/// # Shapes
/// - `hidden`: `[N, H]`, any float dtype (the final-normed hidden states at labelled positions).
/// - `weight`: `[V, H]`, the LM-head weight (frozen); the matmuls run in its dtype, the softmax in f32
///   (as transformers' `logits.float()`).
/// - `targets`: `N` token ids (each `< V`).
///
/// `grad_scale` multiplies the returned gradient (e.g. `1 / num_items_in_batch`).
/// `chunk_rows` bounds the rows processed at once (memory `chunk_rows · V · 8` bytes; `· 4` on the
/// CPU with an f32 contiguous weight, where the two matmuls call `gemm` directly and the logits
/// buffer is kept for the next call; `· size_of(weight dtype)` on CUDA with an f32 or bf16 weight,
/// where one kernel turns the logits into their gradient in place, see `gptoss_kernels::lm_loss`).
pub fn fused_lm_head_loss(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    grad_scale: f64,
    chunk_rows: usize,
) -> Result<FusedLmLoss> {
    let (n, h) = hidden.dims2()?;
    let (v, hw) = weight.dims2()?;
    if h != hw {
        candle_core::bail!("fused_lm_head_loss: hidden [{n}, {h}] vs lm_head weight [{v}, {hw}]");
    }
    if targets.len() != n {
        candle_core::bail!(
            "fused_lm_head_loss: {n} hidden rows but {} targets",
            targets.len()
        );
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("fused_lm_head_loss: target id {bad} is outside the vocabulary of {v}");
    }
    let mut out = FusedLmLoss {
        nll_sum: 0.0,
        correct: 0,
        entropy_sum: 0.0,
        count: n,
        grad_hidden: Tensor::zeros((0, h), hidden.dtype(), hidden.device())?,
    };
    if n == 0 {
        return Ok(out);
    }
    let chunk_rows = chunk_rows.max(1);
    if let Some(grad) =
        cpu_f32_gemm_path(hidden, weight, targets, grad_scale, chunk_rows, &mut out)?
    {
        out.grad_hidden = grad;
        return Ok(out);
    }
    let mut grads = Vec::with_capacity(n.div_ceil(chunk_rows));
    let mut start = 0;
    while start < n {
        let len = chunk_rows.min(n - start);
        let hc = hidden.narrow(0, start, len)?.to_dtype(weight.dtype())?;
        let logits = hc.matmul(&weight.t()?)?;
        let tc = &targets[start..start + len];
        let (stats, grad_logits) = softmax_stats(logits, tc, grad_scale)?;
        out.add_stats(&stats);
        let g = grad_logits
            .to_dtype(weight.dtype())?
            .matmul(weight)?
            .to_dtype(hidden.dtype())?;
        grads.push(g);
        start += len;
    }
    out.grad_hidden = Tensor::cat(&grads, 0)?;
    Ok(out)
}

/// The gradient of `grad_scale · Σ nll` (the loss of [`fused_lm_head_loss`]) with respect to the
/// LM-head `weight`, for full-parameter training: `Σ_chunks (scale · (softmax(h·Wᵀ) − onehot))ᵀ · h`,
/// chunk by chunk like the loss (at most `chunk_rows × V` logits at once).
///
/// # Shapes
/// `hidden` `[N, H]` (any float dtype), `weight` `[V, H]`, `N` `targets` → `[V, H]` in the weight's
/// dtype, not part of any autograd graph.
pub fn lm_head_weight_grad(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    grad_scale: f64,
    chunk_rows: usize,
) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    let weight = weight.detach();
    let mut grad = weight.zeros_like()?;
    let chunk_rows = chunk_rows.max(1);
    let mut start = 0;
    while start < n {
        let len = chunk_rows.min(n - start);
        let hc = hidden
            .narrow(0, start, len)?
            .detach()
            .to_dtype(weight.dtype())?;
        let logits = hc.matmul(&weight.t()?)?;
        let (_, grad_logits) = softmax_stats(logits, &targets[start..start + len], grad_scale)?;
        let g = grad_logits.to_dtype(weight.dtype())?.t()?.matmul(&hc)?;
        grad = (grad + g)?;
        start += len;
    }
    Ok(grad)
}

impl FusedLmLoss {
    fn add_stats(&mut self, stats: &[RowStats]) {
        for s in stats {
            self.nll_sum += s.nll;
            self.entropy_sum += s.entropy;
            self.correct += usize::from(s.correct);
        }
    }
}

/// CPU path for an f32, contiguous LM-head weight: the two matmuls call `gemm` (the sgemm under
/// candle's CPU matmul) on the weight's own buffer, and one `[chunk_rows, V]` logits buffer is
/// reused for every chunk (logits → softmax gradient in place → `∂L/∂h`). Returns `None` (the
/// caller takes the tensor path) off the CPU, for other weight dtypes or a strided weight.
fn cpu_f32_gemm_path(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    grad_scale: f64,
    chunk_rows: usize,
    out: &mut FusedLmLoss,
) -> Result<Option<Tensor>> {
    if !weight.device().is_cpu() || weight.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, h) = hidden.dims2()?;
    let (v, _) = weight.dims2()?;
    let hid = hidden
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (storage, layout) = weight.storage_and_layout();
    let w: &[f32] = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((lo, hi))) => &cpu.as_slice::<f32>()?[lo..hi],
        _ => return Ok(None),
    };
    let mut grad = vec![0f32; n * h];
    let mut logits = take_logits_buffer(chunk_rows.min(n) * v);
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    let mut start = 0;
    while start < n {
        let len = chunk_rows.min(n - start);
        let buf = &mut logits[..len * v];
        let hc = &hid[start * h..(start + len) * h];
        logits_gemm(buf, hc, w, (len, v, h), par);
        let tc = &targets[start..start + len];
        let stats: Vec<RowStats> = buf
            .par_chunks_mut(v)
            .zip(tc.par_iter())
            .map(|(row, &t)| softmax_row(row, t as usize, grad_scale))
            .collect();
        out.add_stats(&stats);
        let gc = &mut grad[start * h..(start + len) * h];
        grad_gemm(gc, buf, w, (len, v, h), par);
        start += len;
    }
    return_logits_buffer(logits);
    let grad = Tensor::from_vec(grad, (n, h), &Device::Cpu)?.to_dtype(hidden.dtype())?;
    Ok(Some(grad.to_device(hidden.device())?))
}

/// `buf` `[len, V]` ← `hc` `[len, H]` · `w`ᵀ (`w` `[V, H]` row-major), with `gemm`.
fn logits_gemm(
    buf: &mut [f32],
    hc: &[f32],
    w: &[f32],
    (len, v, h): (usize, usize, usize),
    par: gemm::Parallelism,
) {
    debug_assert!(buf.len() >= len * v && hc.len() >= len * h && w.len() >= v * h);
    // SAFETY: buf is [len, V] row-major, hc is [len, H] row-major, w is [V, H] row-major read
    // as Wᵀ [H, V] (row stride 1, column stride H); all in bounds, no aliasing.
    unsafe {
        gemm::gemm(
            len,
            v,
            h,
            buf.as_mut_ptr(),
            1,
            v as isize,
            false,
            hc.as_ptr(),
            1,
            h as isize,
            w.as_ptr(),
            h as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `gc` `[len, H]` ← `buf` `[len, V]` · `w` (`[V, H]` row-major), with `gemm`.
fn grad_gemm(
    gc: &mut [f32],
    buf: &[f32],
    w: &[f32],
    (len, v, h): (usize, usize, usize),
    par: gemm::Parallelism,
) {
    debug_assert!(gc.len() >= len * h && buf.len() >= len * v && w.len() >= v * h);
    // SAFETY: gc is [len, H] row-major, buf [len, V] row-major, w [V, H] row-major.
    unsafe {
        gemm::gemm(
            len,
            h,
            v,
            gc.as_mut_ptr(),
            1,
            h as isize,
            false,
            buf.as_ptr(),
            1,
            v as isize,
            w.as_ptr(),
            1,
            h as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// The `[chunk_rows, V]` logits buffer of the last call, kept so that every training step does not
/// page-fault ~200 MB of fresh memory (≈ 0.05 s per step at V = 201,088). At most one buffer is
/// kept; concurrent calls allocate their own.
static LOGITS_BUFFER: Mutex<Vec<f32>> = Mutex::new(Vec::new());

/// A buffer of `len` f32 (contents unspecified), reusing the kept one when present.
fn take_logits_buffer(len: usize) -> Vec<f32> {
    let mut buf = LOGITS_BUFFER
        .lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default();
    buf.resize(len, 0.0);
    buf
}

/// Keeps `buf` for the next call.
fn return_logits_buffer(buf: Vec<f32>) {
    if let Ok(mut kept) = LOGITS_BUFFER.lock() {
        *kept = buf;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};

    /// Reference: plain autograd through log_softmax on the full logits.
    fn reference(h: &Tensor, w: &Tensor, t: &[u32], scale: f64) -> Result<(f64, Tensor)> {
        let hv = Var::from_tensor(h)?;
        let logits = hv.as_tensor().matmul(&w.t()?)?;
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let idx = Tensor::from_slice(t, (t.len(), 1), h.device())?;
        let nll = lsm.gather(&idx, D::Minus1)?.neg()?.sum_all()?;
        let grads = (&nll * scale)?.backward()?;
        let g = grads
            .get(hv.as_tensor())
            .cloned()
            .unwrap_or(h.zeros_like()?);
        Ok((nll.to_scalar::<f32>()? as f64, g))
    }

    #[test]
    fn fused_matches_autograd_cpu_and_generic() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (7, 16), &dev)?;
        let w = Tensor::randn(0f32, 0.5, (50, 16), &dev)?;
        let t = [3u32, 0, 49, 7, 7, 12, 30];
        let (ref_nll, ref_g) = reference(&h, &w, &t, 0.25)?;
        let fused = fused_lm_head_loss(&h, &w, &t, 0.25, 3)?;
        assert!((fused.nll_sum - ref_nll).abs() < 1e-4 * ref_nll.abs().max(1.0));
        let diff = (&fused.grad_hidden - &ref_g)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "grad diff {diff}");
        let logits = h.matmul(&w.t()?)?;
        // Entropy of the softmax, computed directly.
        let p = candle_nn::ops::softmax_last_dim(&logits)?;
        let ent = (p.clone() * p.log()?)?
            .sum_all()?
            .neg()?
            .to_scalar::<f32>()? as f64;
        assert!((fused.entropy_sum - ent).abs() < 1e-3);
        Ok(())
    }

    #[test]
    fn gemm_path_matches_tensor_path_across_calls() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (37, 24), &dev)?;
        // A transposed (strided) weight takes the tensor path; its contiguous copy the gemm path.
        let w_strided = Tensor::randn(0f32, 0.5, (24, 1000), &dev)?.t()?;
        let w = w_strided.contiguous()?;
        let t: Vec<u32> = (0..37).map(|i| (i * 271 % 1000) as u32).collect();
        let want = fused_lm_head_loss(&h, &w_strided, &t, 0.5, 8)?;
        // Growing and shrinking chunk sizes exercise the kept logits buffer.
        for chunk in [5, 64, 16, 1] {
            let got = fused_lm_head_loss(&h, &w, &t, 0.5, chunk)?;
            assert!((got.nll_sum - want.nll_sum).abs() < 1e-4 * want.nll_sum.abs());
            assert!((got.entropy_sum - want.entropy_sum).abs() < 1e-4 * want.entropy_sum.abs());
            assert_eq!(got.correct, want.correct);
            let diff = (&got.grad_hidden - &want.grad_hidden)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "chunk {chunk}: grad diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn rejects_out_of_vocab_target() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::zeros((1, 4), DType::F32, &dev)?;
        let w = Tensor::zeros((5, 4), DType::F32, &dev)?;
        assert!(fused_lm_head_loss(&h, &w, &[5], 1.0, 8).is_err());
        Ok(())
    }
}
