//! [`topk_softmax`]: the router's top-k experts per token and the softmax over their logits.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{check_dtype, cpu_f32, cpu_out, cpu_u32};

/// The `k` largest logits of each token and their softmax, as transformers' `GptOssTopKRouter`
/// computes them (`torch.topk`, then `softmax` over the k values in f32): `logits` `[N, E]` (f32 or
/// bf16; `k` at most 32, `E` at most 256) → (`weights` `[N, k]` in the logits' dtype, `indices`
/// `[N, k]` u32, largest first; equal logits: the lower expert first, as a stable descending sort
/// gives; NaN ranks above every number, as in `torch.topk`).
///
/// `weights` is differentiable in `logits`: `∂logits[t, indices[t, j]] = w_j (∂w_j − Σ_i w_i ∂w_i)`
/// (f32, from the f32 weights), 0 at the other experts. One kernel each for the indices, the weights
/// and the backward (in place of a sort, a gather and the softmax's dozen ops and their backward).
pub fn topk_softmax(logits: &Tensor, k: usize) -> candle_core::Result<(Tensor, Tensor)> {
    check_dtype(logits, "topk_softmax: logits")?;
    let (_n, e) = logits.dims2()?;
    if e > MAX_EXPERTS {
        candle_core::bail!("topk_softmax: {e} experts, the kernels take at most {MAX_EXPERTS}");
    }
    if k == 0 || k > e || k > MAX_K {
        candle_core::bail!(
            "topk_softmax: k = {k} must be in 1..={} for {e} experts",
            e.min(MAX_K)
        );
    }
    let logits = logits.contiguous()?;
    let indices = logits.detach().apply_op1_no_bwd(&TopK { k })?;
    let weights = logits.apply_op2(&indices, TopKSoftmax)?;
    Ok((weights, indices))
}

/// The most experts per token (`TOPK_MAX` of the kernels' per-thread arrays).
const MAX_K: usize = 32;

/// The most experts (32 lanes × `TOPK_EPL` experts per lane in the kernels).
const MAX_EXPERTS: usize = 256;

/// Whether `v` ranks above `b`: NaN above every number (as in `torch.topk`), else `>`.
fn ranks_above(v: f32, b: f32) -> bool {
    match (v.is_nan(), b.is_nan()) {
        (true, false) => true,
        (false, false) => v > b,
        _ => false,
    }
}

/// Top-k indices (largest first, ties by lower index) and values of one row.
fn top_of_row(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut out: Vec<(usize, f32)> = Vec::with_capacity(k);
    for _ in 0..k {
        let mut best: Option<(usize, f32)> = None;
        for (c, &v) in row.iter().enumerate() {
            if out.iter().any(|&(i, _)| i == c) {
                continue;
            }
            if best.is_none_or(|(_, b)| ranks_above(v, b)) {
                best = Some((c, v));
            }
        }
        if let Some(b) = best {
            out.push(b);
        }
    }
    out
}

/// Softmax of the top-k values in f32 (max, exp, sum in order, divide), as the kernel computes it.
fn weights_of(vals: &[f32]) -> Vec<f32> {
    let m = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = vals.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// The indices op (no gradient).
struct TopK {
    k: usize,
}

impl CustomOp1 for TopK {
    fn name(&self) -> &'static str {
        "moe-topk"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, e) = l.shape().dims2()?;
        let lg = cpu_f32(s, l, "topk_softmax: logits")?;
        let out = (0..n)
            .flat_map(|t| top_of_row(&lg[t * e..][..e], self.k))
            .map(|p| p.0 as u32)
            .collect();
        Ok((CpuStorage::U32(out), Shape::from((n, self.k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = l.shape().dims2()?.0;
        Ok((
            super::cuda::topk_indices((s, l), self.k)?,
            Shape::from((n, self.k)),
        ))
    }
}

/// Token `t`'s experts (from `idx` `[N, k]`) and the softmax weights of its logits there (`lg`
/// `[N, E]`, f32 as the kernels compute it), or an error for an index not below `e`.
fn gathered(
    lg: &[f32],
    idx: &[u32],
    t: usize,
    (e, k): (usize, usize),
) -> candle_core::Result<(Vec<usize>, Vec<f32>)> {
    let ix: Vec<usize> = idx[t * k..][..k].iter().map(|&i| i as usize).collect();
    if let Some(&bad) = ix.iter().find(|&&i| i >= e) {
        candle_core::bail!("topk_softmax: index {bad} of token {t} is not < {e}");
    }
    let vals: Vec<f32> = ix.iter().map(|&i| lg[t * e + i]).collect();
    Ok((ix, weights_of(&vals)))
}

/// The weights op: `(logits [N, E], indices [N, k] u32)` → the softmax weights of the logits at
/// the indices `[N, k]`, with the backward to the logits.
struct TopKSoftmax;

impl CustomOp2 for TopKSoftmax {
    fn name(&self) -> &'static str {
        "moe-topk-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, e) = l.shape().dims2()?;
        let k = il.shape().elem_count() / n.max(1);
        let lg = cpu_f32(s, l, "topk_softmax: logits")?;
        let idx = cpu_u32(is, il, "topk_softmax: indices")?;
        let mut out = Vec::with_capacity(n * k);
        for t in 0..n {
            out.extend(gathered(&lg, idx, t, (e, k))?.1);
        }
        Ok((cpu_out(out, s.dtype(), "topk_softmax")?, il.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        is: &candle_core::CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::topk_softmax((s, l), (is, il), None)?,
            il.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        indices: &Tensor,
        _w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().to_dtype(logits.dtype())?.contiguous()?;
        let dl = logits
            .detach()
            .apply_op3_no_bwd(indices, &g, &TopKSoftmaxBwd)?;
        Ok((Some(dl), None))
    }
}

/// `(logits [N, E], indices [N, k] u32, ∂weights [N, k])` → `∂logits [N, E]`.
struct TopKSoftmaxBwd;

impl CustomOp3 for TopKSoftmaxBwd {
    fn name(&self) -> &'static str {
        "moe-topk-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        is: &CpuStorage,
        il: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, e) = l.shape().dims2()?;
        let k = il.shape().elem_count() / n.max(1);
        let lg = cpu_f32(s, l, "topk_softmax: logits")?;
        let idx = cpu_u32(is, il, "topk_softmax: indices")?;
        let g = cpu_f32(gs, gl, "topk_softmax backward: grad")?;
        let mut out = vec![0f32; n * e];
        for t in 0..n {
            let (ix, w) = gathered(&lg, idx, t, (e, k))?;
            let gt = &g[t * k..][..k];
            let dot: f32 = w.iter().zip(gt).map(|(w, g)| w * g).sum();
            for j in 0..k {
                out[t * e + ix[j]] = w[j] * (gt[j] - dot);
            }
        }
        Ok((
            cpu_out(out, s.dtype(), "topk_softmax backward")?,
            Shape::from((n, e)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        is: &candle_core::CudaStorage,
        il: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::topk_softmax((s, l), (is, il), Some((gs, gl)))?,
            l.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rel_diff;
    use candle_core::{DType, Device, Var, D};

    /// What `Router::route` computed with candle ops before: sort, gather, f32 softmax.
    fn composed(logits: &Tensor, k: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let indices = logits
            .detach()
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, k)?
            .contiguous()?;
        let top = logits.gather(&indices, D::Minus1)?;
        let dtype = top.dtype();
        let top = top.to_dtype(DType::F32)?;
        let max = top.max_keepdim(D::Minus1)?.detach();
        let e = top.broadcast_sub(&max)?.exp()?;
        let w = e
            .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .to_dtype(dtype)?;
        Ok((w, indices))
    }

    /// Logits `[n, e]` with repeated values (ties), scaled.
    fn logits(n: usize, e: usize, scale: f32, dev: &Device) -> candle_core::Result<Tensor> {
        let v: Vec<f32> = (0..n * e)
            .map(|i| ((i * 7919 % 23) as f32 - 11.0) * scale)
            .collect();
        Tensor::from_vec(v, (n, e), dev)
    }

    #[test]
    fn matches_sort_gather_softmax_values_ties_and_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, e, k) = (9, 32, 4);
        let l = Var::from_tensor(&logits(n, e, 0.37, &dev)?)?;
        let (w, idx) = topk_softmax(l.as_tensor(), k)?;
        let (rw, ridx) = composed(l.as_tensor(), k)?;
        assert_eq!(idx.to_vec2::<u32>()?, ridx.to_vec2::<u32>()?);
        let d = rel_diff(&w, &rw)?;
        assert!(d < 1e-6, "weights differ by {d}");
        let g = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let ga = (&w * &g)?.sum_all()?.backward()?;
        let gr = (&rw * &g)?.sum_all()?.backward()?;
        let (Some(a), Some(r)) = (ga.get(l.as_tensor()), gr.get(l.as_tensor())) else {
            panic!("no logits gradient");
        };
        let d = rel_diff(a, r)?;
        assert!(d < 1e-6, "logits gradient differs by {d}");
        // NaN ranks first, as in torch.topk
        let nan = Tensor::new(&[[1f32, f32::NAN, 3.0, 2.0]], &dev)?;
        assert_eq!(topk_softmax(&nan, 2)?.1.to_vec2::<u32>()?, vec![vec![1, 2]]);
        assert!(topk_softmax(l.as_tensor(), 0).is_err());
        assert!(topk_softmax(l.as_tensor(), 33).is_err());
        Ok(())
    }

    /// The device kernels against the CPU at gpt-oss-20b's router shape (2048 tokens, 32 experts,
    /// top 4), f32 and bf16, ties included.
    #[cfg(feature = "cuda")]
    #[test]
    fn device_matches_cpu() -> candle_core::Result<()> {
        let gpu = crate::test_util::gpu()?;
        let cpu = Device::Cpu;
        let (n, e, k) = (2048, 32, 4);
        let base = (Tensor::randn(0f32, 1.0, (n, e), &cpu)? + logits(n, e, 0.25, &cpu)?)?;
        let g = Tensor::randn(0f32, 1.0, (n, k), &cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let l = base.to_dtype(dtype)?;
            let run = |dev: &Device| -> candle_core::Result<(Tensor, Tensor, Tensor)> {
                let l = Var::from_tensor(&l.to_device(dev)?)?;
                let (w, idx) = topk_softmax(l.as_tensor(), k)?;
                let gw = g.to_dtype(dtype)?.to_device(dev)?;
                let grads = (w.to_dtype(DType::F32)? * gw.to_dtype(DType::F32)?)?
                    .sum_all()?
                    .backward()?;
                let Some(dl) = grads.get(l.as_tensor()).cloned() else {
                    candle_core::bail!("no logits gradient");
                };
                Ok((
                    w.to_device(&cpu)?,
                    idx.to_device(&cpu)?,
                    dl.to_device(&cpu)?,
                ))
            };
            let (cw, ci, cd) = run(&cpu)?;
            let (gw, gi, gd) = run(&gpu)?;
            assert_eq!(
                ci.to_vec2::<u32>()?,
                gi.to_vec2::<u32>()?,
                "{dtype:?}: indices"
            );
            // expf on the device and exp on the host may differ in the last f32 bit, which can move
            // a bf16 rounding by one step
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let d = rel_diff(&gw, &cw)?;
            assert!(d < tol, "{dtype:?}: weights differ by {d}");
            let d = rel_diff(&gd, &cd)?;
            assert!(d < tol, "{dtype:?}: logits gradient differs by {d}");
        }
        Ok(())
    }
}
