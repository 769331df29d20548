//! Row-grouped matmul of the MoE: rows `off..off+len` of `x` times expert `e`'s frozen weight, for every
//! span `(e, off, len)`, as **one** autograd node.
//!
//! Doing it with candle ops (`x.narrow(0, off, len)` then `matmul` per expert) costs, per expert and per
//! pass, a copy of the expert weight (`Tensor::get` reshapes the non-contiguous slice of a dequantized
//! `[E, in, out]` view) and, in the backward, a full-size zero padding plus a full-size add of the
//! `[M, in]` input gradient (candle's `narrow` backward): 32 × `M·in` elements per layer. Here the
//! forward runs one GEMM per span on offsets of the same storages (no weight copy) and the backward is
//! the same op on the transposed weights, producing the whole `∂x` `[M, in]` at once.
//!
//! On CUDA ([`cuda`]) each span is one cuBLAS GEMM written straight into its rows of the output, and
//! MXFP4-resident weights ([`GroupedWeight::Packed`]) are dequantized one expert at a time into a
//! reused scratch buffer just before that expert's GEMM: no layer-sized bf16 copy of the experts
//! (1.48 GiB per gpt-oss-20b layer) is ever allocated, and experts without rows are not decoded.

use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod lt;
#[cfg(feature = "cuda")]
pub(crate) mod mxfp4_gemm;
pub mod routed;

pub use routed::{routed_matmul, routed_matmul_dense};

/// `(expert, first row, rows)` of each group; the groups tile `0..M` in order.
pub type Spans = Arc<Vec<(usize, usize, usize)>>;

/// The frozen weight of a grouped matmul, `[E, in, out]` as the matmul sees it.
#[derive(Debug, Clone)]
pub enum GroupedWeight {
    /// A dense `[E, in, out]` tensor whose `[in, out]` slices have a unit stride in one dimension
    /// (contiguous, or the transpose of a contiguous `[E, out, in]`).
    Dense(Tensor),
    /// MXFP4 checkpoint blocks `u8 [E, rows, cols/32, 16]` and scales `u8 [E, rows, cols/32]` of
    /// one `[rows, cols]` matrix per expert, dequantized to `dtype` when used: as `[E, cols, rows]`
    /// (`transposed: false`, a transformers `[E, in, out]` parameter stored `[E, out, in]`) or as
    /// `[E, rows, cols]` (`transposed: true`: its transpose, for the backward).
    Packed {
        /// `*_blocks`.
        blocks: Tensor,
        /// `*_scales`.
        scales: Tensor,
        /// Dequantized dtype (the run dtype).
        dtype: DType,
        /// Used as `[E, rows, cols]` instead of `[E, cols, rows]`.
        transposed: bool,
    },
}

impl GroupedWeight {
    /// `(E, in, out)`.
    fn dims(&self) -> candle_core::Result<(usize, usize, usize)> {
        match self {
            Self::Dense(w) => w.dims3(),
            Self::Packed {
                blocks, transposed, ..
            } => {
                let (e, rows, groups, _) = blocks.dims4()?;
                let cols = groups * 32;
                Ok(if *transposed {
                    (e, rows, cols)
                } else {
                    (e, cols, rows)
                })
            }
        }
    }

    /// Random MXFP4 weights of `(e, rows, cols)` (uniform random bytes, E8M0 scales uniform in
    /// `scale_lo..=scale_hi`), as stored (`transposed: false`), decoding to bf16: test and bench
    /// data on `dev`. `cols` must be a multiple of 32.
    pub fn random_mxfp4(
        (e, rows, cols): (usize, usize, usize),
        scale_lo: u8,
        scale_hi: u8,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let blocks = Tensor::rand(0f32, 256.0, (e, rows, cols / 32, 16), dev)?
            .floor()?
            .clamp(0f32, 255.0)?
            .to_dtype(DType::U8)?;
        let (lo, hi) = (f32::from(scale_lo), f32::from(scale_hi));
        let scales = Tensor::rand(lo, hi + 1.0, (e, rows, cols / 32), dev)?
            .floor()?
            .clamp(lo, hi)?
            .to_dtype(DType::U8)?;
        Ok(Self::Packed {
            blocks,
            scales,
            dtype: DType::BF16,
            transposed: false,
        })
    }

    /// The weight used as `[E, out, in]`.
    pub fn transpose(&self) -> candle_core::Result<Self> {
        self.map(|w| w.transpose(1, 2), |t| Ok(t.clone()), true)
    }

    /// This weight with `dense` applied to a dense tensor, or `packed` to both the blocks and the
    /// scales (the orientation flipped when `flip`).
    fn map(
        &self,
        dense: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
        packed: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        flip: bool,
    ) -> candle_core::Result<Self> {
        Ok(match self {
            Self::Dense(w) => Self::Dense(dense(w)?),
            Self::Packed {
                blocks,
                scales,
                dtype,
                transposed,
            } => Self::Packed {
                blocks: packed(blocks)?,
                scales: packed(scales)?,
                dtype: *dtype,
                transposed: *transposed != flip,
            },
        })
    }

    /// The whole weight as a dense `[E, in, out]` tensor (dequantized here when packed).
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
            Self::Packed {
                blocks,
                scales,
                dtype,
                transposed,
            } => {
                let d = gptoss_mxfp4::dequantize(
                    blocks,
                    scales,
                    *dtype,
                    gptoss_mxfp4::Layout::Checkpoint,
                )
                .map_err(|e| candle_core::Error::Msg(format!("grouped_matmul: {e}")))?;
                if *transposed {
                    Ok(d)
                } else {
                    d.transpose(1, 2)
                }
            }
        }
    }

    /// Experts `first..first + count` of this weight (views, nothing decoded; [`Self::dense`] of
    /// the result decodes just those).
    pub fn experts(&self, first: usize, count: usize) -> candle_core::Result<Self> {
        let narrow = |t: &Tensor| t.narrow(0, first, count);
        self.map(narrow, narrow, false)
    }

    /// The experts `ids` (`u32 [M]`, repeats allowed) of this weight, in that order: `[M, in, out]`
    /// as a weight of `M` experts, nothing decoded ([`Self::dense`] of the result decodes just
    /// those). The gather reads the stored (contiguous) layout, so a dense weight held as the
    /// transpose of a contiguous `[E, out, in]` is gathered in that layout and transposed back.
    pub fn gathered(&self, ids: &Tensor) -> candle_core::Result<Self> {
        let dense = |t: &Tensor| {
            if t.is_contiguous() {
                t.index_select(ids, 0)
            } else {
                t.transpose(1, 2)?
                    .contiguous()?
                    .index_select(ids, 0)?
                    .transpose(1, 2)
            }
        };
        self.map(dense, |t| t.contiguous()?.index_select(ids, 0), false)
    }

    /// Whether a grouped matmul of `x` (`[M, in]`, rows grouped by `spans`) on this weight would
    /// decode it inside one fused GEMM kernel (MXFP4 weight, bf16 activations on CUDA, row counts
    /// the kernel is chosen for) rather than into bf16 copies of the experts.
    pub fn decoded_in_kernel(&self, x: &Tensor, spans: &[(usize, usize, usize)]) -> bool {
        #[cfg(feature = "cuda")]
        {
            let busy = spans.iter().filter(|s| s.2 > 0).count();
            matches!(self, Self::Packed { .. })
                && x.device().is_cuda()
                && mxfp4_gemm::chosen(x.dtype(), x.dim(0).unwrap_or(usize::MAX), busy)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (x, spans);
            false
        }
    }
}

/// `x` `[M, in]` (rows grouped by `spans`), `w` `[E, in, out]` frozen → `[M, out]`, same dtype as `x`
/// (and as the weight). Differentiable in `x` only.
pub fn grouped_matmul(x: &Tensor, w: &GroupedWeight, spans: &Spans) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (_, k, _) = w.dims()?;
    let (m, k2) = x.dims2()?;
    if k != k2 {
        candle_core::bail!("grouped_matmul: x is [{m}, {k2}] but the weight takes {k} inputs");
    }
    let op = Grouped {
        w: w.clone(),
        spans: spans.clone(),
    };
    // apply_op1 records the backward only when x takes part in autograd
    x.apply_op1(op)
}

struct Grouped {
    w: GroupedWeight,
    spans: Spans,
}

/// Checks that the spans lie inside `[E] × [M]`; true when they tile `0..M` in order (every output
/// row written: no zero fill needed).
fn check_spans(spans: &Spans, e_count: usize, m: usize) -> candle_core::Result<bool> {
    let mut next = 0;
    let mut tiles = true;
    for &(e, off, len) in spans.iter() {
        if e >= e_count || off + len > m {
            candle_core::bail!(
                "grouped_matmul: span ({e}, {off}, {len}) outside [{e_count}] x [{m}]"
            );
        }
        tiles &= off == next;
        next += len;
    }
    Ok(tiles && next == m)
}

impl Grouped {
    /// The backend-generic path (the CPU): one backend matmul per span on offset layouts.
    fn run<S>(&self, s: &S, l: &Layout, w: &S, wl: &Layout) -> candle_core::Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let (m, k) = l.shape().dims2()?;
        let (e_count, _, n) = wl.shape().dims3()?;
        if l.contiguous_offsets().is_none() {
            candle_core::bail!("grouped_matmul: x must be contiguous");
        }
        let ws = wl.stride();
        let shape = Shape::from((m, n));
        let mut out = if check_spans(&self.spans, e_count, m)? {
            // SAFETY: every row is written by the span matmuls below (the spans tile 0..m).
            unsafe { s.device().alloc_uninit(&shape, s.dtype())? }
        } else {
            s.device().zeros_impl(&shape, s.dtype())?
        };
        for &(e, off, len) in self.spans.iter() {
            if len == 0 {
                continue;
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
        let w = self.w.dense()?;
        let (ws, wl) = w.storage_and_layout();
        let w = crate::storage::cpu_of(&ws, "grouped_matmul weight")?;
        self.run(s, l, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::grouped(s, l, &self.w, &self.spans)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let wt = self.w.transpose()?;
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
    fn gathered_experts_equal_the_rows_of_the_whole_dense_weight() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[2u32, 0, 2], &dev)?;
        let contiguous = GroupedWeight::Dense(Tensor::randn(0f32, 1.0, (3, 4, 5), &dev)?);
        let transposed =
            GroupedWeight::Dense(Tensor::randn(0f32, 1.0, (3, 5, 4), &dev)?.transpose(1, 2)?);
        let packed = GroupedWeight::random_mxfp4((3, 8, 64), 120, 130, &dev)?;
        for w in [contiguous, transposed, packed.clone(), packed.transpose()?] {
            let want = w.dense()?.to_dtype(DType::F32)?;
            let got = w.gathered(&ids)?.dense()?.to_dtype(DType::F32)?;
            assert_eq!(got.dims(), [3, want.dim(1)?, want.dim(2)?]);
            for (r, ex) in [2usize, 0, 2].into_iter().enumerate() {
                let d = (got.get(r)? - want.get(ex)?)?.abs()?.max_all()?;
                assert_eq!(d.to_scalar::<f32>()?, 0.0, "row {r} (expert {ex})");
            }
        }
        Ok(())
    }

    #[test]
    fn matches_per_expert_matmuls_values_and_input_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (e, k, n) = (3, 4, 5);
        // a dequantized-like view: [E, out, in] contiguous, transposed to [E, in, out]
        let w = Tensor::randn(0f32, 1.0, (e, n, k), &dev)?.transpose(1, 2)?;
        let spans: Spans = Arc::new(vec![(2, 0, 2), (0, 2, 0), (1, 2, 3)]);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, k), &dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (5, n), &dev)?;
        let y = grouped_matmul(x.as_tensor(), &GroupedWeight::Dense(w.clone()), &spans)?;
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
