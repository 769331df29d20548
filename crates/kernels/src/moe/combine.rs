//! [`combine`]: down bias, routing weights and the sum over each token's experts.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::{check_dtype, cpu_f32, cpu_of, cpu_out, cpu_u32, float_operand, index, indices};

/// Weighted sum of each token's expert outputs: `ys` `[M, H]` (f32 or bf16; the routed rows before
/// the down bias), `weights` `[N, k]` (routing weights, converted to ys's dtype), `pos` `[N, k]` u32
/// (the row of `ys` holding token `t`'s slot `s`; every row appears once), `bias` `[E, H]` (the down
/// bias, converted to ys's dtype), `expert` `[N, k]` u32 (the expert of each slot) → `[N, H]` in
/// ys's dtype:
///
/// `out[t] = Σ_s weights[t, s] · (ys[pos[t, s]] + bias[expert[t, s]])`, accumulated in f32.
///
/// Differentiable in `ys` (`∂ys[pos[t, s]] = weights[t, s] · ∂out[t]`) and in `weights`
/// (`∂weights[t, s] = ∂out[t] · (ys[pos[t, s]] + bias[expert[t, s]])`); the bias is frozen.
pub fn combine(
    ys: &Tensor,
    weights: &Tensor,
    pos: &Tensor,
    bias: &Tensor,
    expert: &Tensor,
) -> candle_core::Result<Tensor> {
    check_dtype(ys, "combine: ys")?;
    let (m, h) = ys.dims2()?;
    let (n, k) = weights.dims2()?;
    let (_e, bh) = bias.dims2()?;
    if n * k != m || bh != h {
        candle_core::bail!(
            "combine: weights {:?}, bias {:?} do not fit ys {:?} (expected [N, k] with N·k = {m}, [E, {h}])",
            weights.dims(),
            bias.dims(),
            ys.dims()
        );
    }
    let ctx = Ctx::new(pos, bias, expert, (n, k), ys.dtype())?;
    let w = weights.to_dtype(ys.dtype())?.contiguous()?;
    ys.contiguous()?.apply_op2(&w, Combine(ctx))
}

/// [`combine`]'s gradient with respect to `ys` on its own (no forward needed): `dout` `[N, H]`,
/// `weights` `[N, k]`, `pos`/`expert` `[N, k]` u32, `bias` `[E, H]` as in [`combine`] → `∂ys`
/// `[N·k, H]` in dout's dtype, row `pos[t, s]` = `weights[t, s] · dout[t]`.
pub(crate) fn combine_grad_rows(
    dout: &Tensor,
    weights: &Tensor,
    pos: &Tensor,
    bias: &Tensor,
    expert: &Tensor,
) -> candle_core::Result<Tensor> {
    let ctx = Ctx::for_grad(dout, pos, bias, expert)?;
    let w = weights.to_dtype(dout.dtype())?.contiguous()?;
    dout.contiguous()?
        .apply_op2_no_bwd(&w, &CombineBwdRows(ctx))
}

/// [`combine`]'s gradient with respect to `weights` on its own: `dout` `[N, H]`, the routed rows
/// `ys` `[N·k, H]` (before the bias, dout's dtype), maps and bias as in [`combine`] → `∂weights`
/// `[N, k]` in dout's dtype, `dout[t] · (ys[pos[t, s]] + bias[expert[t, s]])`.
fn combine_grad_weights(
    dout: &Tensor,
    ys: &Tensor,
    pos: &Tensor,
    bias: &Tensor,
    expert: &Tensor,
) -> candle_core::Result<Tensor> {
    let ctx = Ctx::for_grad(dout, pos, bias, expert)?;
    dout.contiguous()?
        .apply_op2_no_bwd(&ys.contiguous()?, &CombineBwdWeights(ctx))
}

/// [`combine_grad_weights`] from the weighted products instead of the rows: `dout` `[N, H]`, `dots`
/// `[N·k]` f32 with `dots[pos[t, s]] = weights[t, s] · (dout[t] · ys[pos[t, s]])` (what
/// [`row_dots`](super::row_dots) of the rows' gradient `∂ys·Wᵀ` and the down projection's input
/// gives, without `ys`), `weights` `[N, k]`, maps and bias as in [`combine`] → `∂weights` `[N, k]` in
/// dout's dtype, `dots[pos[t, s]] / weights[t, s] + dout[t] · bias[expert[t, s]]`.
///
/// Where a weight is 0 the first term is taken as 0, so that slot's value lacks `dout[t] · ys`: exact
/// only for callers whose weights come from a softmax (its Jacobian multiplies that slot's gradient
/// by the weight, so the value does not reach the logits), as the router's do.
pub(crate) fn combine_grad_weights_from_dots(
    dout: &Tensor,
    dots: &Tensor,
    weights: &Tensor,
    pos: &Tensor,
    bias: &Tensor,
    expert: &Tensor,
) -> candle_core::Result<Tensor> {
    let ctx = Ctx::for_grad(dout, pos, bias, expert)?;
    if weights.dims() != pos.dims() || dout.dim(0)? != pos.dim(0)? {
        candle_core::bail!(
            "combine backward: weights {:?} and dout {:?} do not fit pos {:?} (expected weights [N, k], dout [N, H])",
            weights.dims(),
            dout.dims(),
            pos.dims()
        );
    }
    if dots.dtype() != DType::F32 || dots.elem_count() != pos.elem_count() {
        candle_core::bail!(
            "combine backward: dots {:?} {:?}, expected {} f32 values (one per routed row)",
            dots.dims(),
            dots.dtype(),
            pos.elem_count()
        );
    }
    let w = weights.to_dtype(dout.dtype())?.contiguous()?;
    dout.contiguous()?
        .apply_op3_no_bwd(&dots.contiguous()?, &w, &CombineBwdDots(ctx))
}

/// The index maps and the frozen bias.
#[derive(Clone)]
struct Ctx {
    pos: Tensor,
    bias: Tensor,
    expert: Tensor,
}

/// CPU view of the index maps and the bias.
struct CpuCtx<'a> {
    pos: &'a [u32],
    expert: &'a [u32],
    bias: std::borrow::Cow<'a, [f32]>,
    num_e: usize,
}

impl Ctx {
    /// The maps `[n, k]` and the bias in `dtype`, checked.
    fn new(
        pos: &Tensor,
        bias: &Tensor,
        expert: &Tensor,
        (n, k): (usize, usize),
        dtype: candle_core::DType,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            pos: indices(pos, n * k, "combine: pos")?.reshape((n, k))?,
            bias: float_operand(bias, dtype)?,
            expert: indices(expert, n * k, "combine: expert")?.reshape((n, k))?,
        })
    }

    /// The context of a backward op on `dout` (checked f32/bf16; maps `[N, k]` from `pos`).
    fn for_grad(
        dout: &Tensor,
        pos: &Tensor,
        bias: &Tensor,
        expert: &Tensor,
    ) -> candle_core::Result<Self> {
        check_dtype(dout, "combine backward: grad")?;
        Self::new(pos, bias, expert, pos.dims2()?, dout.dtype())
    }

    /// Runs `f` with the CPU view (indices not yet checked).
    fn with_cpu<R>(
        &self,
        f: impl FnOnce(CpuCtx<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (pg, pl) = self.pos.storage_and_layout();
        let (eg, el) = self.expert.storage_and_layout();
        let (bg, bl) = self.bias.storage_and_layout();
        let bias = cpu_f32(cpu_of(&bg, "combine: bias")?, bl, "combine: bias")?;
        let num_e = self.bias.dim(0)?;
        f(CpuCtx {
            pos: cpu_u32(cpu_of(&pg, "combine: pos")?, pl, "combine: pos")?,
            expert: cpu_u32(cpu_of(&eg, "combine: expert")?, el, "combine: expert")?,
            bias,
            num_e,
        })
    }

    /// Runs `f` with the CUDA storages and layouts of `(pos, bias, expert)`.
    #[cfg(feature = "cuda")]
    fn with_cuda<R>(
        &self,
        f: impl FnOnce(super::cuda::Held<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (pg, pl) = self.pos.storage_and_layout();
        let (eg, el) = self.expert.storage_and_layout();
        let (bg, bl) = self.bias.storage_and_layout();
        f(super::cuda::Held {
            pos: (super::cuda_of(&pg, "combine: pos")?, pl),
            bias: (super::cuda_of(&bg, "combine: bias")?, bl),
            expert: (super::cuda_of(&eg, "combine: expert")?, el),
        })
    }
}

impl CpuCtx<'_> {
    /// `(slot index t·k + s, row of ys, bias row)` of every slot, indices checked against `m` rows.
    fn slots(&self, m: usize, h: usize) -> candle_core::Result<Vec<(usize, usize, &[f32])>> {
        self.pos
            .iter()
            .zip(self.expert)
            .enumerate()
            .map(|(i, (&r, &e))| {
                let r = index(r, m, "combine: pos", i)?;
                let e = index(e, self.num_e, "combine: expert", i)?;
                Ok((i, r, &self.bias[e * h..][..h]))
            })
            .collect()
    }
}

struct Combine(Ctx);

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "moe-combine"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, h) = l.shape().dims2()?;
        let (n, k) = wl.shape().dims2()?;
        let ys = cpu_f32(s, l, "combine: ys")?;
        let w = cpu_f32(ws, wl, "combine: weights")?;
        let out = self.0.with_cpu(|c| {
            let mut out = vec![0f32; n * h];
            for (i, r, b) in c.slots(m, h)? {
                let o = &mut out[(i / k) * h..][..h];
                for ((o, y), b) in o.iter_mut().zip(&ys[r * h..][..h]).zip(b) {
                    *o += w[i] * (y + b);
                }
            }
            Ok(out)
        })?;
        Ok((cpu_out(out, s.dtype(), "combine")?, Shape::from((n, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_m, h) = l.shape().dims2()?;
        let (n, _k) = wl.shape().dims2()?;
        let out = self
            .0
            .with_cuda(|c| super::cuda::combine((s, l), (ws, wl), &c))?;
        Ok((out, Shape::from((n, h))))
    }

    fn bwd(
        &self,
        ys: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        crate::profile::scope("moe.combine.bwd", grad.device(), || {
            let g = grad.detach().to_dtype(ys.dtype())?;
            let Ctx { pos, bias, expert } = &self.0;
            let dys = match ys.track_op() {
                true => Some(combine_grad_rows(&g, &w.detach(), pos, bias, expert)?),
                false => None,
            };
            let dw = match w.track_op() {
                true => Some(combine_grad_weights(&g, &ys.detach(), pos, bias, expert)?),
                false => None,
            };
            Ok((dys, dw))
        })
    }
}

/// `(∂out [N, H], weights [N, k])` → `∂ys [M, H]` (rows no slot points to get zero).
struct CombineBwdRows(Ctx);

impl CustomOp2 for CombineBwdRows {
    fn name(&self) -> &'static str {
        "moe-combine-bwd-rows"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_n, h) = l.shape().dims2()?;
        let (_n, k) = wl.shape().dims2()?;
        let m = wl.shape().elem_count();
        let g = cpu_f32(s, l, "combine backward: grad")?;
        let w = cpu_f32(ws, wl, "combine: weights")?;
        let out = self.0.with_cpu(|c| {
            let mut out = vec![0f32; m * h];
            for (i, r, _) in c.slots(m, h)? {
                let src = &g[(i / k) * h..][..h];
                for (o, v) in out[r * h..][..h].iter_mut().zip(src) {
                    *o = w[i] * v;
                }
            }
            Ok(out)
        })?;
        Ok((
            cpu_out(out, s.dtype(), "combine backward")?,
            Shape::from((m, h)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_n, h) = l.shape().dims2()?;
        let m = wl.shape().elem_count();
        let out = self
            .0
            .with_cuda(|c| super::cuda::combine_bwd_rows((s, l), (ws, wl), &c))?;
        Ok((out, Shape::from((m, h))))
    }
}

/// `(∂out [N, H], ys [M, H])` → `∂weights [N, k]` (ys's dtype).
struct CombineBwdWeights(Ctx);

impl CustomOp2 for CombineBwdWeights {
    fn name(&self) -> &'static str {
        "moe-combine-bwd-weights"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_n, h) = l.shape().dims2()?;
        let (m, _h) = yl.shape().dims2()?;
        let shape = self.0.pos.shape().clone();
        let k = self.0.pos.dim(1)?;
        let g = cpu_f32(s, l, "combine backward: grad")?;
        let y = cpu_f32(ys, yl, "combine: ys")?;
        let out = self.0.with_cpu(|c| {
            let mut out = vec![0f32; m];
            for (i, r, b) in c.slots(m, h)? {
                let dout = &g[(i / k) * h..][..h];
                out[i] = dout
                    .iter()
                    .zip(&y[r * h..][..h])
                    .zip(b)
                    .map(|((d, y), b)| d * (y + b))
                    .sum();
            }
            Ok(out)
        })?;
        Ok((cpu_out(out, s.dtype(), "combine backward")?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.0.pos.shape().clone();
        let out = self.0.with_cuda(|c| {
            let rows = super::cuda::Products::Rows((ys, yl));
            super::cuda::combine_bwd_weights((s, l), rows, &c)
        })?;
        Ok((out, shape))
    }
}

/// `(∂out [N, H], dots [N·k] f32, weights [N, k])` → `∂weights [N, k]` (dout's dtype).
struct CombineBwdDots(Ctx);

impl CustomOp3 for CombineBwdDots {
    fn name(&self) -> &'static str {
        "moe-combine-bwd-dots"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_n, h) = l.shape().dims2()?;
        let m = dl.shape().elem_count();
        let (_n, k) = wl.shape().dims2()?;
        let g = cpu_f32(s, l, "combine backward: grad")?;
        let dots = cpu_f32(ds, dl, "combine backward: dots")?;
        let w = cpu_f32(ws, wl, "combine: weights")?;
        let out = self.0.with_cpu(|c| {
            let mut out = vec![0f32; m];
            for (i, r, b) in c.slots(m, h)? {
                let dout = &g[(i / k) * h..][..h];
                let bias: f32 = dout.iter().zip(b).map(|(d, b)| d * b).sum();
                out[i] = bias + if w[i] != 0.0 { dots[r] / w[i] } else { 0.0 };
            }
            Ok(out)
        })?;
        Ok((
            cpu_out(out, s.dtype(), "combine backward")?,
            wl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.0.with_cuda(|c| {
            let from = super::cuda::Products::Dots {
                dots: (ds, dl),
                w: (ws, wl),
            };
            super::cuda::combine_bwd_weights((s, l), from, &c)
        })?;
        Ok((out, wl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rel_diff;
    use candle_core::{Device, Var};

    /// The candle-op formulation `Experts` used before: per-row bias, weight, index_add.
    fn reference(
        ys: &Tensor,
        w: &Tensor,
        tokens: &Tensor,
        pairs: &Tensor,
        row_expert: &Tensor,
        bias: &Tensor,
        n: usize,
    ) -> candle_core::Result<Tensor> {
        let y = (ys + bias.index_select(row_expert, 0)?)?;
        let w = w.flatten_all()?.index_select(pairs, 0)?.unsqueeze(1)?;
        let y = y.broadcast_mul(&w)?;
        Tensor::zeros((n, ys.dim(1)?), ys.dtype(), ys.device())?.index_add(tokens, &y, 0)
    }

    #[test]
    fn matches_candle_ops_values_and_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, k, h, e) = (5, 3, 7, 4);
        let m = n * k;
        // experts of each (token, slot), distinct per token
        let ex: Vec<u32> = (0..m).map(|i| ((i / k + i % k) % e) as u32).collect();
        // rows grouped by expert (stable), as Experts::forward builds them
        let mut pairs: Vec<usize> = (0..m).collect();
        pairs.sort_by_key(|&p| ex[p]);
        let mut pos = vec![0u32; m];
        for (row, &p) in pairs.iter().enumerate() {
            pos[p] = row as u32;
        }
        let tokens: Vec<u32> = pairs.iter().map(|&p| (p / k) as u32).collect();
        let row_expert: Vec<u32> = pairs.iter().map(|&p| ex[p]).collect();
        let pairs: Vec<u32> = pairs.iter().map(|&p| p as u32).collect();
        let (tokens, pairs) = (Tensor::new(tokens, &dev)?, Tensor::new(pairs, &dev)?);
        let row_expert = Tensor::new(row_expert, &dev)?;
        let pos = Tensor::from_vec(pos, (n, k), &dev)?;
        let expert = Tensor::from_vec(ex, (n, k), &dev)?;

        let ys = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, h), &dev)?)?;
        let w = Var::from_tensor(&Tensor::rand(0f32, 1.0, (n, k), &dev)?)?;
        let bias = Tensor::randn(0f32, 1.0, (e, h), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (n, h), &dev)?;
        let (yt, wt) = (ys.as_tensor(), w.as_tensor());
        let a = combine(yt, wt, &pos, &bias, &expert)?;
        let r = reference(yt, wt, &tokens, &pairs, &row_expert, &bias, n)?;
        let d = rel_diff(&a, &r)?;
        assert!(d < 1e-6, "forward differs by {d}");
        let ga = (&a * &g)?.sum_all()?.backward()?;
        let gr = (&r * &g)?.sum_all()?.backward()?;
        for (name, t) in [("ys", yt), ("weights", wt)] {
            let (Some(da), Some(dr)) = (ga.get(t), gr.get(t)) else {
                panic!("missing gradient of {name}");
            };
            let d = rel_diff(da, dr)?;
            assert!(d < 1e-6, "gradient of {name} differs by {d}");
        }
        Ok(())
    }
}
