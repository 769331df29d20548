//! [`row_dots`]: the dot product of matching rows of two matrices, in f32.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::{check_dtype, cpu_f32, cpu_out};

/// `out[m] = a[m] · b[m]`: `a`, `b` `[M, H]` (both f32 or both bf16) → `[M]` f32, accumulated in f32
/// (not differentiable).
pub(crate) fn row_dots(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    check_dtype(a, "row_dots: a")?;
    if a.dims2()? != b.dims2()? || a.dtype() != b.dtype() {
        candle_core::bail!(
            "row_dots: a is {:?} {:?}, b {:?} {:?} (expected the same [M, H] and dtype)",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        );
    }
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &RowDots)
}

struct RowDots;

impl CustomOp2 for RowDots {
    fn name(&self) -> &'static str {
        "moe-row-dots"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, h) = l.shape().dims2()?;
        let a = cpu_f32(s, l, "row_dots: a")?;
        let b = cpu_f32(s2, l2, "row_dots: b")?;
        let out: Vec<f32> = (0..m)
            .map(|r| {
                let (x, y) = (&a[r * h..][..h], &b[r * h..][..h]);
                x.iter().zip(y).map(|(x, y)| x * y).sum()
            })
            .collect();
        Ok((cpu_out(out, DType::F32, "row_dots")?, Shape::from(m)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let m = l.shape().dims2()?.0;
        Ok((super::cuda::row_dots((s, l), (s2, l2))?, Shape::from(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_product_summed_over_each_row() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (5, 7), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (5, 7), &dev)?;
        let want: Vec<f32> = (&a * &b)?.sum(1)?.to_vec1()?;
        let got: Vec<f32> = row_dots(&a, &b)?.to_vec1()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        assert!(row_dots(&a, &b.narrow(1, 0, 6)?).is_err());
        Ok(())
    }

    /// The device kernels of `row_dots` and `combine_grad_weights_from_dots` against the CPU, at
    /// gpt-oss-20b's widths (bf16 and f32, one routing weight exactly 0).
    #[cfg(feature = "cuda")]
    #[test]
    fn device_matches_cpu() -> candle_core::Result<()> {
        use crate::moe::combine_grad_weights_from_dots;
        use crate::test_util::rel_diff;
        let gpu = crate::test_util::gpu()?;
        let cpu = Device::Cpu;
        let (n, k, e, h, i) = (37usize, 4usize, 32usize, 2880usize, 2880usize);
        let m = n * k;
        let ex: Vec<u32> = (0..m)
            .map(|j| ((j / k * 7 + j % k * 5) % e) as u32)
            .collect();
        let pos: Vec<u32> = (0..m).map(|j| ((j * 13) % m) as u32).collect();
        let (ex, pos) = (
            Tensor::from_vec(ex, (n, k), &cpu)?,
            Tensor::from_vec(pos, (n, k), &cpu)?,
        );
        let mut w: Vec<f32> = Tensor::rand(0.01f32, 1.0, m, &cpu)?.to_vec1()?;
        w[5] = 0.0;
        let w = Tensor::from_vec(w, (n, k), &cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let a = Tensor::randn(0f32, 1.0, (m, i), &cpu)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1.0, (m, i), &cpu)?.to_dtype(dtype)?;
            let want = row_dots(&a, &b)?;
            let got = row_dots(&a.to_device(&gpu)?, &b.to_device(&gpu)?)?.to_device(&cpu)?;
            let d = rel_diff(&got, &want)?;
            assert!(d < 1e-5, "{dtype:?}: row_dots differs by {d}");

            let g = Tensor::randn(0f32, 1.0, (n, h), &cpu)?.to_dtype(dtype)?;
            let bias = Tensor::randn(0f32, 1.0, (e, h), &cpu)?.to_dtype(dtype)?;
            let on = |t: &Tensor| t.to_device(&gpu);
            let want = combine_grad_weights_from_dots(&g, &want, &w, &pos, &bias, &ex)?;
            let got = combine_grad_weights_from_dots(
                &on(&g)?,
                &on(&got)?,
                &on(&w)?,
                &on(&pos)?,
                &on(&bias)?,
                &on(&ex)?,
            )?
            .to_device(&cpu)?;
            let d = rel_diff(&got.to_dtype(DType::F32)?, &want.to_dtype(DType::F32)?)?;
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(
                d < tol,
                "{dtype:?}: weights' gradient from dots differs by {d}"
            );
        }
        Ok(())
    }
}
