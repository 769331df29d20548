//! Row-grouped matmul of the MoE: rows `off..off+len` of `x` times expert `e`'s frozen weight, for every
//! span `(e, off, len)`, as **one** autograd node.
//!
//! Doing it with candle ops (`x.narrow(0, off, len)` then `matmul` per expert) costs, per expert and per
//! pass, a copy of the expert weight (`Tensor::get` reshapes the non-contiguous slice of a dequantized
//! `[E, in, out]` view) and, in the backward, a full-size zero padding plus a full-size add of the
//! `[M, in]` input gradient (candle's `narrow` backward): 32 × `M·in` elements per layer. Here the
//! forward runs one backend matmul per span on offset layouts of the same storages (no weight copy) and
//! the backward is the same op on the transposed weights, producing the whole `∂x` `[M, in]` at once.

use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// `(expert, first row, rows)` of each group; the groups tile `0..M` in order.
pub(crate) type Spans = Arc<Vec<(usize, usize, usize)>>;

/// `x` `[M, in]` (rows grouped by `spans`), `w` `[E, in, out]` frozen (any layout whose `[in, out]`
/// slices candle's matmul accepts) → `[M, out]`, same dtype. Differentiable in `x` only.
pub(crate) fn grouped_matmul(x: &Tensor, w: &Tensor, spans: &Spans) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let op = Grouped {
        w: w.clone(),
        spans: spans.clone(),
    };
    // apply_op1 records the backward only when x takes part in autograd
    x.apply_op1(op)
}

struct Grouped {
    w: Tensor,
    spans: Spans,
}

impl Grouped {
    fn run<S>(&self, s: &S, l: &Layout, w: &S, wl: &Layout) -> candle_core::Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let (m, k) = l.shape().dims2()?;
        let (e_count, k2, n) = wl.shape().dims3()?;
        if k != k2 {
            candle_core::bail!("grouped_matmul: x is [{m}, {k}] but w is [{e_count}, {k2}, {n}]");
        }
        if l.contiguous_offsets().is_none() {
            candle_core::bail!("grouped_matmul: x must be contiguous");
        }
        let ws = wl.stride();
        let shape = Shape::from((m, n));
        // Spans that tile 0..m (what the MoE builds) write every output row: no zero fill needed.
        let mut next = 0;
        let tiles = self.spans.iter().all(|&(_, off, len)| {
            let ok = off == next;
            next += len;
            ok
        }) && next == m;
        let mut out = if tiles {
            // SAFETY: every row is written by the span matmuls below (checked just above).
            unsafe { s.device().alloc_uninit(&shape, s.dtype())? }
        } else {
            s.device().zeros_impl(&shape, s.dtype())?
        };
        for &(e, off, len) in self.spans.iter() {
            if len == 0 {
                continue;
            }
            if e >= e_count || off + len > m {
                candle_core::bail!(
                    "grouped_matmul: span ({e}, {off}, {len}) outside [{e_count}] x [{m}]"
                );
            }
            let ll = Layout::contiguous_with_offset((len, k), l.start_offset() + off * k);
            let rl = Layout::new(
                Shape::from((k, n)),
                vec![ws[1], ws[2]],
                wl.start_offset() + e * ws[0],
            );
            let y = s.matmul(w, (1, len, n, k), &ll, &rl)?;
            y.copy_strided_src(&mut out, off * n, &Layout::contiguous((len, n)))?;
        }
        Ok((out, shape))
    }
}

impl CustomOp1 for Grouped {
    fn name(&self) -> &'static str {
        "grouped-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cpu(w) => self.run(s, l, w, wl),
            _ => candle_core::bail!("grouped_matmul: x on the CPU, w elsewhere"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cuda(w) => self.run(s, l, w, wl),
            _ => candle_core::bail!("grouped_matmul: x on CUDA, w elsewhere"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let wt = self.w.transpose(1, 2)?;
        crate::profile::scope("moe.grouped.bwd", grad.device(), || {
            Ok(Some(grouped_matmul(&grad.detach(), &wt, &self.spans)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_per_expert_matmuls_values_and_input_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (e, k, n) = (3, 4, 5);
        // a dequantized-like view: [E, out, in] contiguous, transposed to [E, in, out]
        let w = Tensor::randn(0f32, 1.0, (e, n, k), &dev)?.transpose(1, 2)?;
        let spans: Spans = Arc::new(vec![(2, 0, 2), (0, 2, 0), (1, 2, 3)]);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, k), &dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (5, n), &dev)?;
        let y = grouped_matmul(x.as_tensor(), &w, &spans)?;
        let parts = [
            x.as_tensor().narrow(0, 0, 2)?.matmul(&w.get(2)?)?,
            x.as_tensor().narrow(0, 2, 3)?.matmul(&w.get(1)?)?,
        ];
        let r = Tensor::cat(&parts, 0)?;
        let d = (&y - &r)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "forward differs by {d}");
        let ga = (&y * &g)?.sum_all()?.backward()?;
        let gr = (&r * &g)?.sum_all()?.backward()?;
        let (Some(a), Some(b)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
            panic!("missing gradient");
        };
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "input gradient differs by {d}");
        Ok(())
    }
}
