//! [`swiglu_bias`]: gate/up bias add and the clamped SwiGLU of transformers `GptOssExperts`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::{check_dtype, cpu_f32, cpu_of, cpu_out, cpu_u32, float_operand, index, indices};

/// Clamped SwiGLU on interleaved gate/up columns with the expert's bias added first:
/// `gu` `[M, 2I]` (f32 or bf16; even columns gate, odd columns up), `bias` `[E, 2I]` (converted to
/// gu's dtype), `row_expert` `[M]` u32 (the expert of each row) → `[M, I]` in gu's dtype:
///
/// `g = min(gu[:, 0::2] + bias[e, 0::2], limit)`, `u = clamp(gu[:, 1::2] + bias[e, 1::2], −limit, limit)`,
/// `act = (u + 1) · g · σ(alpha · g)`, computed in f32.
///
/// Differentiable in `gu` only (the bias is frozen). Like torch's `clamp`, the gradient passes where
/// the value lies within the bounds (bounds included) and is zero where it was clamped.
pub fn swiglu_bias(
    gu: &Tensor,
    bias: &Tensor,
    row_expert: &Tensor,
    limit: f64,
    alpha: f64,
) -> candle_core::Result<Tensor> {
    check_dtype(gu, "swiglu_bias: gu")?;
    let (m, two_i) = gu.dims2()?;
    let (_e, b_cols) = bias.dims2()?;
    if two_i % 2 != 0 || b_cols != two_i {
        candle_core::bail!(
            "swiglu_bias: gu {:?} and bias {:?} must have the same even number of columns",
            gu.dims(),
            bias.dims()
        );
    }
    let op = Swiglu {
        bias: float_operand(bias, gu.dtype())?,
        row_expert: indices(row_expert, m, "swiglu_bias: row_expert")?,
        limit: limit as f32,
        alpha: alpha as f32,
    };
    gu.contiguous()?.apply_op1(op)
}

#[derive(Clone)]
struct Swiglu {
    bias: Tensor,
    row_expert: Tensor,
    limit: f32,
    alpha: f32,
}

/// `(g, u)` after the clamps, and whether each passes the gradient.
fn clamp(g: f32, u: f32, limit: f32) -> (f32, f32, bool, bool) {
    // Written so that NaN stays NaN (like torch) and gets no gradient.
    let pass_g = g <= limit;
    let pass_u = u >= -limit && u <= limit;
    let g = if g > limit { limit } else { g };
    let u = if u > limit {
        limit
    } else if u < -limit {
        -limit
    } else {
        u
    };
    (g, u, pass_g, pass_u)
}

/// `σ(alpha·g)`, in the order of operations of candle's `sigmoid(g * alpha)`.
fn sigmoid(g: f32, alpha: f32) -> f32 {
    1.0 / ((-(g * alpha)).exp() + 1.0)
}

impl Swiglu {
    /// Calls `f(row, e, gate/up pairs of the row, bias pairs of e)` for every row (CPU).
    fn for_rows(
        &self,
        s: &CpuStorage,
        l: &Layout,
        mut f: impl FnMut(usize, &[f32], &[f32]),
    ) -> candle_core::Result<()> {
        let (_m, two_i) = l.shape().dims2()?;
        let x = cpu_f32(s, l, "swiglu_bias: gu")?;
        let (bg, bl) = self.bias.storage_and_layout();
        let b = cpu_f32(cpu_of(&bg, "swiglu_bias: bias")?, bl, "swiglu_bias: bias")?;
        let (rg, rl) = self.row_expert.storage_and_layout();
        let re = cpu_u32(
            cpu_of(&rg, "swiglu_bias: row_expert")?,
            rl,
            "swiglu_bias: row_expert",
        )?;
        let num_e = b.len() / two_i.max(1);
        for (row, &e) in re.iter().enumerate() {
            let e = index(e, num_e, "swiglu_bias: row_expert", row)?;
            f(row, &x[row * two_i..][..two_i], &b[e * two_i..][..two_i]);
        }
        Ok(())
    }
}

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "moe-swiglu-bias"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, two_i) = l.shape().dims2()?;
        let i = two_i / 2;
        let mut out = vec![0f32; m * i];
        self.for_rows(s, l, |row, x, b| {
            let o = &mut out[row * i..][..i];
            for (j, o) in o.iter_mut().enumerate() {
                let (g, u, _, _) =
                    clamp(x[2 * j] + b[2 * j], x[2 * j + 1] + b[2 * j + 1], self.limit);
                *o = (u + 1.0) * (g * sigmoid(g, self.alpha));
            }
        })?;
        Ok((cpu_out(out, s.dtype(), "swiglu_bias")?, Shape::from((m, i))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, two_i) = l.shape().dims2()?;
        let (bg, bl) = self.bias.storage_and_layout();
        let (rg, rl) = self.row_expert.storage_and_layout();
        let out = super::cuda::swiglu(
            (s, l),
            None,
            (super::cuda_of(&bg, "swiglu_bias: bias")?, bl),
            (super::cuda_of(&rg, "swiglu_bias: row_expert")?, rl),
            (self.limit, self.alpha),
        )?;
        Ok((out, Shape::from((m, two_i / 2))))
    }

    fn bwd(&self, gu: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        crate::profile::scope("moe.swiglu.bwd", grad.device(), || {
            let g = grad.detach().to_dtype(gu.dtype())?.contiguous()?;
            Ok(Some(
                gu.detach().apply_op2_no_bwd(&g, &SwigluBwd(self.clone()))?,
            ))
        })
    }
}

/// `(gu [M, 2I], ∂act [M, I])` → `∂gu [M, 2I]` (gu's dtype).
struct SwigluBwd(Swiglu);

impl CustomOp2 for SwigluBwd {
    fn name(&self) -> &'static str {
        "moe-swiglu-bias-bwd"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, two_i) = l.shape().dims2()?;
        let i = two_i / 2;
        let (limit, alpha) = (self.0.limit, self.0.alpha);
        let da = cpu_f32(gs, gl, "swiglu_bias backward: grad")?;
        let mut out = vec![0f32; m * two_i];
        self.0.for_rows(s, l, |row, x, b| {
            let o = &mut out[row * two_i..][..two_i];
            let da = &da[row * i..][..i];
            for (j, &d) in da.iter().enumerate() {
                let (g, u, pass_g, pass_u) =
                    clamp(x[2 * j] + b[2 * j], x[2 * j + 1] + b[2 * j + 1], limit);
                let sg = sigmoid(g, alpha);
                let dg = d * (u + 1.0) * (sg + g * alpha * sg * (1.0 - sg));
                let du = d * g * sg;
                o[2 * j] = if pass_g { dg } else { 0.0 };
                o[2 * j + 1] = if pass_u { du } else { 0.0 };
            }
        })?;
        Ok((
            cpu_out(out, s.dtype(), "swiglu_bias backward")?,
            l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (bg, bl) = self.0.bias.storage_and_layout();
        let (rg, rl) = self.0.row_expert.storage_and_layout();
        let out = super::cuda::swiglu(
            (s, l),
            Some((gs, gl)),
            (super::cuda_of(&bg, "swiglu_bias: bias")?, bl),
            (super::cuda_of(&rg, "swiglu_bias: row_expert")?, rl),
            (self.0.limit, self.0.alpha),
        )?;
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rel_diff;
    use candle_core::{DType, Device, Var};

    /// The candle-op formulation `Experts` used before (bias gathered per row, strided views).
    fn reference(
        gu: &Tensor,
        bias: &Tensor,
        row_expert: &Tensor,
        limit: f64,
        alpha: f64,
    ) -> candle_core::Result<Tensor> {
        let gu = (gu + bias.index_select(row_expert, 0)?)?;
        let (n, two_i) = gu.dims2()?;
        let gu = gu.reshape((n, two_i / 2, 2))?;
        let gate = gu.narrow(2, 0, 1)?.squeeze(2)?.minimum(limit)?;
        let up = gu.narrow(2, 1, 1)?.squeeze(2)?.clamp(-limit, limit)?;
        let glu = (&gate * candle_nn::ops::sigmoid(&(&gate * alpha)?)?)?;
        (up + 1.0)? * glu
    }

    #[test]
    fn matches_candle_ops_values_and_gradient_beyond_the_clamps() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (m, i, e) = (9, 6, 3);
        // std 6: many gate/up values beyond ±7
        let gu = Var::from_tensor(&Tensor::randn(0f32, 6.0, (m, 2 * i), &dev)?)?;
        let bias = Tensor::randn(0f32, 1.0, (e, 2 * i), &dev)?;
        let re = Tensor::new(&[0u32, 0, 0, 1, 1, 2, 2, 2, 2], &dev)?;
        let g = Tensor::randn(0f32, 1.0, (m, i), &dev)?;
        let (limit, alpha) = (7.0, 1.702);
        let a = swiglu_bias(gu.as_tensor(), &bias, &re, limit, alpha)?;
        let r = reference(gu.as_tensor(), &bias, &re, limit, alpha)?;
        let d = rel_diff(&a, &r)?;
        assert!(d < 1e-6, "forward differs by {d}");
        let ga = (&a * &g)?.sum_all()?.backward()?;
        let gr = (&r * &g)?.sum_all()?.backward()?;
        let (Some(da), Some(dr)) = (ga.get(gu.as_tensor()), gr.get(gu.as_tensor())) else {
            panic!("missing gradient");
        };
        let d = rel_diff(da, dr)?;
        assert!(d < 1e-6, "gradient differs by {d}");
        // the clamps did bite
        let clamped = (gu.as_tensor() + bias.index_select(&re, 0)?)?
            .abs()?
            .gt(limit)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(clamped > 5.0, "only {clamped} values beyond the limit");
        Ok(())
    }

    #[test]
    fn bf16_is_the_rounded_f32_result() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let gu = Tensor::randn(0f32, 4.0, (4, 8), &dev)?.to_dtype(DType::BF16)?;
        let bias = Tensor::randn(0f32, 1.0, (2, 8), &dev)?.to_dtype(DType::BF16)?;
        let re = Tensor::new(&[1u32, 0, 1, 0], &dev)?;
        let a = swiglu_bias(&gu, &bias, &re, 7.0, 1.702)?;
        let r = swiglu_bias(
            &gu.to_dtype(DType::F32)?,
            &bias.to_dtype(DType::F32)?,
            &re,
            7.0,
            1.702,
        )?
        .to_dtype(DType::BF16)?;
        assert_eq!(rel_diff(&a, &r)?, 0.0);
        Ok(())
    }
}
