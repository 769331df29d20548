//! [`gather_rows`]: the routed rows `x[tokens[m]]`; backward: the sum of each token's k row gradients.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{check_dtype, cpu_f32, cpu_of, cpu_out, cpu_u32, index, indices};

/// Routed rows: `x` `[N, H]` (f32 or bf16), `tokens` `[M]` u32 (the token of each routed row),
/// `pos` `[N, k]` u32 (its inverse: `pos[t, s]` is the row of token `t`'s slot `s`; every row appears
/// once) → `[M, H]` with row `m` = `x[tokens[m]]`, x's dtype. Differentiable in `x`:
/// `∂x[t] = Σ_s ∂out[pos[t, s]]` (accumulated in f32, no atomics).
pub fn gather_rows(x: &Tensor, tokens: &Tensor, pos: &Tensor) -> candle_core::Result<Tensor> {
    check_dtype(x, "gather_rows: x")?;
    let (n, _h) = x.dims2()?;
    let m = tokens.elem_count();
    let (pn, k) = pos.dims2()?;
    if pn != n || pn * k != m {
        candle_core::bail!(
            "gather_rows: pos is {:?} but x has {n} rows and tokens {m} entries (expected [{n}, {}])",
            pos.dims(),
            m / n.max(1)
        );
    }
    let op = GatherRows {
        tokens: indices(tokens, m, "gather_rows: tokens")?,
        pos: indices(pos, m, "gather_rows: pos")?,
    };
    x.contiguous()?.apply_op1(op)
}

struct GatherRows {
    tokens: Tensor,
    pos: Tensor,
}

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "moe-gather-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h) = l.shape().dims2()?;
        let x = cpu_f32(s, l, "gather_rows: x")?;
        let (tg, tl) = self.tokens.storage_and_layout();
        let tokens = cpu_u32(
            cpu_of(&tg, "gather_rows: tokens")?,
            tl,
            "gather_rows: tokens",
        )?;
        let mut out = Vec::with_capacity(tokens.len() * h);
        for (m, &t) in tokens.iter().enumerate() {
            let t = index(t, n, "gather_rows: tokens", m)?;
            out.extend_from_slice(&x[t * h..][..h]);
        }
        Ok((
            cpu_out(out, s.dtype(), "gather_rows")?,
            Shape::from((tokens.len(), h)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, h) = l.shape().dims2()?;
        let m = self.tokens.elem_count();
        let (tg, tl) = self.tokens.storage_and_layout();
        let tokens = super::cuda_of(&tg, "gather_rows: tokens")?;
        let out = super::cuda::gather_rows(s, l, tokens, tl, (n, h, m))?;
        Ok((out, Shape::from((m, h))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        crate::profile::scope("moe.gather.bwd", grad.device(), || {
            Ok(Some(sum_rows(&grad.detach(), &self.pos)?))
        })
    }
}

/// [`gather_rows`]'s backward: `g` `[M, H]` → `[N, H]` with row `t` = `Σ_s g[pos[t, s]]`
/// (`pos` `[N, k]` u32; f32 accumulation, g's dtype).
pub(crate) fn sum_rows(g: &Tensor, pos: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k) = pos.dims2()?;
    let pos = indices(pos, n * k, "gather_rows: pos")?.reshape((n, k))?;
    g.contiguous()?.apply_op1_no_bwd(&SumRows { pos })
}

/// `g` `[M, H]` → `[N, H]`: row `t` = `Σ_s g[pos[t, s]]` (f32 accumulation, g's dtype).
struct SumRows {
    pos: Tensor,
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "moe-gather-rows-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, h) = l.shape().dims2()?;
        let (n, k) = self.pos.dims2()?;
        let g = cpu_f32(s, l, "gather_rows backward: grad")?;
        let (pg, pl) = self.pos.storage_and_layout();
        let pos = cpu_u32(cpu_of(&pg, "gather_rows: pos")?, pl, "gather_rows: pos")?;
        let mut out = vec![0f32; n * h];
        for (i, &r) in pos.iter().enumerate() {
            let r = index(r, m, "gather_rows: pos", i)?;
            let t = i / k;
            for (o, v) in out[t * h..][..h].iter_mut().zip(&g[r * h..][..h]) {
                *o += v;
            }
        }
        Ok((
            cpu_out(out, s.dtype(), "gather_rows backward")?,
            Shape::from((n, h)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, h) = l.shape().dims2()?;
        let (n, k) = self.pos.dims2()?;
        let (pg, pl) = self.pos.storage_and_layout();
        let pos = super::cuda_of(&pg, "gather_rows: pos")?;
        let out = super::cuda::sum_rows(s, l, pos, pl, (m, h, n, k))?;
        Ok((out, Shape::from((n, h))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rel_diff;
    use candle_core::{Device, Var};

    #[test]
    fn matches_index_select_values_and_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, h, k) = (5, 7, 3);
        // rows grouped by some expert order: (token, slot) pairs in a shuffled order
        let order: Vec<usize> = vec![4, 9, 0, 14, 2, 7, 11, 5, 13, 1, 8, 3, 12, 6, 10];
        let tokens: Vec<u32> = order.iter().map(|&p| (p / k) as u32).collect();
        let mut pos = vec![0u32; n * k];
        for (row, &p) in order.iter().enumerate() {
            pos[p] = row as u32;
        }
        let tokens = Tensor::new(tokens.as_slice(), &dev)?;
        let pos = Tensor::from_vec(pos, (n, k), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h), &dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (n * k, h), &dev)?;
        let a = gather_rows(x.as_tensor(), &tokens, &pos)?;
        let r = x.as_tensor().index_select(&tokens, 0)?;
        assert_eq!(rel_diff(&a, &r)?, 0.0);
        let ga = (&a * &g)?.sum_all()?.backward()?;
        let gr = (&r * &g)?.sum_all()?.backward()?;
        let (Some(da), Some(dr)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
            panic!("missing gradient");
        };
        let d = rel_diff(da, dr)?;
        assert!(d < 1e-6, "gradient differs by {d}");
        Ok(())
    }

    #[test]
    fn out_of_range_token_is_an_error() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &dev)?;
        let tokens = Tensor::new(&[0u32, 2], &dev)?;
        let pos = Tensor::new(&[[0u32], [1]], &dev)?;
        let e = gather_rows(&x, &tokens, &pos).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("tokens[1] = 2"), "{e}");
        Ok(())
    }
}
