//! LoRA on a 3-D expert weight with PEFT `ParamWrapper` semantics, computed per routed token.
//!
//! PEFT stores one adapter for all E experts of a weight `W` `[E, in, out]`:
//! A `[r·E, in]` with **expert-major rows** (row `e·r + j` = expert e, rank j) and
//! B `[out, r·E]` with **rank-major columns** (column `j·E + e` = rank j, expert e), and defines
//! `ΔW[e, i, o] = scaling · Σ_j A[e·r+j, i] · B[o, j·E+e]`; the forward uses `W + ΔW`.
//!
//! Here the tokens routed to expert e go through `A_e = A[e·r..(e+1)·r]` `[r, in]` and
//! `B_e = B[:, {j·E+e}]` `[out, r]`: `x·ΔW[e] = scaling · (x·A_eᵀ)·B_eᵀ`, never materializing ΔW
//! (`O(n·r·(in+out))` per expert instead of `O(in·out)`).

use candle_core::{DType, Tensor, Var};
use gptoss_model::ExpertAdapter;

/// The adapter of one expert weight. Factors are f32 [`Var`]s: A `[r·E, in]`, B `[out, r·E]` (PEFT layout).
#[derive(Debug, Clone)]
pub struct LoraExperts {
    a: Var,
    b: Var,
    num_experts: usize,
    r: usize,
    scaling: f64,
}

impl LoraExperts {
    /// An adapter from its PEFT-layout factors; `r` is the per-expert rank.
    pub fn new(a: Var, b: Var, num_experts: usize, r: usize, scaling: f64) -> Self {
        LoraExperts {
            a,
            b,
            num_experts,
            r,
            scaling,
        }
    }

    /// lora_A `[r·E, in]` f32.
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// lora_B `[out, r·E]` f32.
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// The output scaling.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Expert e's factors: (A_e `[r, in]`, B_e `[out, r]`), f32, differentiable views of the Vars.
    pub fn expert_factors(&self, expert: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (r, e_count) = (self.r, self.num_experts);
        if expert >= e_count {
            candle_core::bail!("expert index {expert} out of range (E = {e_count})");
        }
        let a_e = self.a.as_tensor().narrow(0, expert * r, r)?;
        let out = self.b.dim(0)?;
        let b_e = self
            .b
            .as_tensor()
            .reshape((out, r, e_count))?
            .narrow(2, expert, 1)?
            .reshape((out, r))?;
        Ok((a_e, b_e))
    }

    /// Expert e's dense update `ΔW[e] = scaling·A_eᵀ·B_eᵀ`, `[in, out]` f32 (for merging expert by expert,
    /// which keeps the peak memory at one expert's ΔW).
    pub fn expert_delta_weight(&self, expert: usize) -> candle_core::Result<Tensor> {
        let (a_e, b_e) = self.expert_factors(expert)?;
        a_e.t()?.matmul(&b_e.t()?)? * self.scaling
    }

    /// Expert e's merged weight `W[e] + sign·ΔW[e]` (PEFT `ParamWrapper.merge` with `sign` +1,
    /// `unmerge` with −1): `w_e` `[in, out]` (any float dtype) plus ΔW cast to `w_e`'s dtype first,
    /// as PEFT does.
    pub fn merged_expert(
        &self,
        w_e: &Tensor,
        expert: usize,
        sign: f64,
    ) -> candle_core::Result<Tensor> {
        let dw = (self.expert_delta_weight(expert)?.detach() * sign)?;
        w_e + dw.to_dtype(w_e.dtype())?.to_device(w_e.device())?
    }

    /// Number of experts E.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// The dense update `ΔW` `[E, in, out]` f32 (PEFT `get_delta_weight`, einsum "o r e, e r i -> e i o").
    /// Used for merging; the forward never builds it.
    pub fn delta_weight(&self) -> candle_core::Result<Tensor> {
        let (r, e) = (self.r, self.num_experts);
        let in_dim = self.a.dim(1)?;
        let out = self.b.dim(0)?;
        let a3 = self.a.as_tensor().reshape((e, r, in_dim))?; // [E, r, in]
        let b3 = self
            .b
            .as_tensor()
            .reshape((out, r, e))?
            .permute((2, 1, 0))?
            .contiguous()?; // [E, r, out]
        a3.transpose(1, 2)?.contiguous()?.matmul(&b3)? * self.scaling
    }
}

impl ExpertAdapter for LoraExperts {
    /// `x` `[n, in]` (rows routed to `expert`, run dtype) → `scaling·(x·A_eᵀ)·B_eᵀ` `[n, out]` in x's dtype.
    fn delta(&self, expert: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let (a_e, b_e) = self.expert_factors(expert)?;
        let h = x.to_dtype(DType::F32)?.matmul(&a_e.t()?)?;
        let y = (h.matmul(&b_e.t()?)? * self.scaling)?;
        y.to_dtype(x.dtype())
    }

    /// On CUDA one fused node for all rows ([`gptoss_kernels::lora::expert_delta`]); on other devices
    /// (or shapes those kernels do not take) two matmuls instead of two per expert (each a handful of
    /// kernel launches and autograd nodes): `h = x·Aᵀ` `[M, r·E]` for all experts, masked to each
    /// row's own expert block, then `h·B'ᵀ` with B's columns reordered expert-major — the same sums as
    /// [`Self::delta`] (the masked terms are exact zeros) at E× the (small) FLOPs. The CPU keeps the
    /// per-expert path.
    fn delta_grouped(
        &self,
        x: &Tensor,
        spans: &[(usize, usize, usize)],
    ) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            return gptoss_model::hooks::delta_per_expert(self, x, spans);
        }
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let fused =
            gptoss_kernels::lora::expert_delta(x, a, b, spans, self.num_experts, self.scaling)?;
        match fused {
            Some(y) => Ok(y),
            None => self.masked_delta(x, spans),
        }
    }
}

impl LoraExperts {
    /// The two-matmul form of [`ExpertAdapter::delta_grouped`] (any device).
    fn masked_delta(
        &self,
        x: &Tensor,
        spans: &[(usize, usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let (m, _) = x.dims2()?;
        let (r, e_count) = (self.r, self.num_experts);
        let mut row_expert = Vec::with_capacity(m);
        for &(e, _, len) in spans {
            if e >= e_count {
                candle_core::bail!("expert index {e} out of range (E = {e_count})");
            }
            row_expert.extend(std::iter::repeat_n(e as u32, len));
        }
        if row_expert.len() != m {
            candle_core::bail!("spans cover {} rows, x has {m}", row_expert.len());
        }
        let dev = x.device();
        let rows = Tensor::from_vec(row_expert, (m, 1), dev)?;
        // expert of each column of h (e·r + j → e)
        let col_expert: Vec<u32> = (0..r * e_count).map(|c| (c / r) as u32).collect();
        let cols = Tensor::from_vec(col_expert, (1, r * e_count), dev)?;
        let mask = rows.broadcast_eq(&cols)?.to_dtype(DType::F32)?; // [M, r·E]
        let h = x.to_dtype(DType::F32)?.matmul(&self.a.as_tensor().t()?)?;
        let out = self.b.dim(0)?;
        // column e·r + j of B' = column j·E + e of B
        let b_perm = self
            .b
            .as_tensor()
            .reshape((out, r, e_count))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((out, r * e_count))?;
        let y = ((h * mask)?.matmul(&b_perm.t()?)? * self.scaling)?;
        y.to_dtype(x.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn seq(n: usize, shift: f32, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.7 + shift).sin()) * scale)
            .collect()
    }

    /// ΔW[e,i,o] = s·Σ_j A[e·r+j, i]·B[o, j·E+e], written out with index loops (reference.md §6).
    fn dense_reference(
        a: &[f32],
        b: &[f32],
        e_n: usize,
        r: usize,
        inp: usize,
        out: usize,
        s: f32,
    ) -> Vec<f32> {
        let mut dw = vec![0f32; e_n * inp * out];
        for e in 0..e_n {
            for i in 0..inp {
                for o in 0..out {
                    let mut acc = 0f32;
                    for j in 0..r {
                        acc += a[(e * r + j) * inp + i] * b[o * (r * e_n) + j * e_n + e];
                    }
                    dw[(e * inp + i) * out + o] = s * acc;
                }
            }
        }
        dw
    }

    #[test]
    fn per_token_path_equals_dense_delta() {
        let dev = Device::Cpu;
        let (e_n, r, inp, out, n, s) = (3usize, 2usize, 5usize, 4usize, 6usize, 1.5f32);
        let a = seq(r * e_n * inp, 0.1, 0.5);
        let b = seq(out * r * e_n, 1.3, 0.8);
        let ad = LoraExperts::new(
            Var::from_tensor(&Tensor::from_vec(a.clone(), (r * e_n, inp), &dev).unwrap()).unwrap(),
            Var::from_tensor(&Tensor::from_vec(b.clone(), (out, r * e_n), &dev).unwrap()).unwrap(),
            e_n,
            r,
            s as f64,
        );
        let dw_ref = dense_reference(&a, &b, e_n, r, inp, out, s);
        let dw: Vec<f32> = ad
            .delta_weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (x, y) in dw.iter().zip(&dw_ref) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        let xs = seq(n * inp, 2.0, 1.0);
        let x = Tensor::from_vec(xs.clone(), (n, inp), &dev).unwrap();
        for e in 0..e_n {
            let got: Vec<Vec<f32>> = ad.delta(e, &x).unwrap().to_vec2().unwrap();
            for t in 0..n {
                for o in 0..out {
                    let want: f32 = (0..inp)
                        .map(|i| xs[t * inp + i] * dw_ref[(e * inp + i) * out + o])
                        .sum();
                    assert!(
                        (got[t][o] - want).abs() < 1e-5,
                        "e{e} t{t} o{o}: {} vs {want}",
                        got[t][o]
                    );
                }
            }
        }
        assert!(ad.delta(e_n, &x).is_err());
    }

    #[test]
    fn gradients_flow_to_both_factors() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::from_vec(seq(8 * 3, 0.0, 1.0), (8, 3), &dev).unwrap())
            .unwrap();
        let b = Var::from_tensor(&Tensor::from_vec(seq(2 * 8, 1.0, 1.0), (2, 8), &dev).unwrap())
            .unwrap();
        let ad = LoraExperts::new(a.clone(), b.clone(), 4, 2, 2.0);
        let x = Tensor::from_vec(seq(5 * 3, 3.0, 1.0), (5, 3), &dev).unwrap();
        let loss = ad.delta(1, &x).unwrap().sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let ga: Vec<Vec<f32>> = g.get(a.as_tensor()).unwrap().to_vec2().unwrap();
        // only rows 2..4 of A (expert 1) get gradient
        for (row, v) in ga.iter().enumerate() {
            assert_eq!(
                v.iter().any(|x| *x != 0.0),
                (2..4).contains(&row),
                "row {row}"
            );
        }
        let gb: Vec<Vec<f32>> = g.get(b.as_tensor()).unwrap().to_vec2().unwrap();
        // only columns j·E + 1 of B (expert 1): 1 and 5
        for v in &gb {
            for (c, x) in v.iter().enumerate() {
                assert_eq!(*x != 0.0, c == 1 || c == 5, "col {c}");
            }
        }
    }

    #[test]
    fn masked_grouped_delta_equals_per_expert_values_and_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (e_n, r, inp, out) = (4, 2, 6, 5);
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (e_n * r, inp), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (out, r * e_n), &dev)?)?;
        let l = LoraExperts::new(a.clone(), b.clone(), e_n, r, 0.75);
        let spans = [(2usize, 0usize, 3usize), (0, 3, 1), (3, 4, 4)];
        let x = Tensor::randn(0f32, 1.0, (8, inp), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (8, out), &dev)?;
        let per = Tensor::cat(
            &spans
                .iter()
                .map(|&(e, o, n)| l.delta(e, &x.narrow(0, o, n)?))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let masked = l.masked_delta(&x, &spans)?;
        // relative to the reference's scale (random factors give values of any magnitude)
        let diff = |p: &Tensor, q: &Tensor| -> candle_core::Result<f32> {
            let d = (p - q)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let s = q.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            Ok(d / s.max(1.0))
        };
        assert!(diff(&per, &masked)? < 1e-5);
        let gp = (&per * &g)?.sum_all()?.backward()?;
        let gm = (&masked * &g)?.sum_all()?.backward()?;
        for v in [&a, &b] {
            let (Some(p), Some(q)) = (gp.get(v.as_tensor()), gm.get(v.as_tensor())) else {
                panic!("missing gradient");
            };
            assert!(diff(p, q)? < 1e-5, "gradient differs by {}", diff(p, q)?);
        }
        Ok(())
    }
}
