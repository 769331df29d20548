//! Experts kept resident as MXFP4 (as the checkpoint stores them) and dequantized inside the MoE's
//! grouped matmul: on CUDA one expert at a time into a reused scratch matrix, only for experts that
//! have rows, in the forward, the gradient-checkpointing recompute and the backward alike.
//!
//! gpt-oss-20b's experts are 24 × 32 × (2880·5760 + 2880·2880) weights: 38 GB in bf16, 10.1 GB as
//! MXFP4 (4.25 bits a weight). Dequantizing a whole layer at once would cost 1.6 GB of transient bf16;
//! per expert it is 33 MB.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::hooks::ExpertParam;
use gptoss_kernels::grouped::GroupedWeight;

/// One layer's expert weights in the MXFP4 checkpoint layout: `*_blocks` u8 `[E, out, in/32, 16]`
/// and `*_scales` u8 `[E, out, in/32]`, for `gate_up_proj` (in = H, out = 2I) and `down_proj`
/// (in = I, out = H).
#[derive(Debug, Clone)]
pub struct PackedExperts {
    gate_up_blocks: Tensor,
    gate_up_scales: Tensor,
    down_blocks: Tensor,
    down_scales: Tensor,
}

fn check_pair(name: &str, blocks: &Tensor, scales: &Tensor) -> Result<()> {
    let bd = blocks.dims();
    let ok = bd.len() == 4
        && bd[3] == 16
        && scales.dims() == &bd[..3]
        && blocks.dtype() == DType::U8
        && scales.dtype() == DType::U8;
    if ok {
        Ok(())
    } else {
        Err(ModelError::arg(
            name,
            format!(
                "expected blocks u8 [E, out, in/32, 16] and scales u8 [E, out, in/32], got {:?} {:?} and {:?} {:?}",
                blocks.dims(),
                blocks.dtype(),
                scales.dims(),
                scales.dtype()
            ),
        ))
    }
}

impl PackedExperts {
    /// From the four checkpoint tensors (u8, contiguous, on the run device).
    pub fn new(
        gate_up_blocks: Tensor,
        gate_up_scales: Tensor,
        down_blocks: Tensor,
        down_scales: Tensor,
    ) -> Result<Self> {
        check_pair("gate_up_proj", &gate_up_blocks, &gate_up_scales)?;
        check_pair("down_proj", &down_blocks, &down_scales)?;
        Ok(Self {
            gate_up_blocks: gate_up_blocks.contiguous()?,
            gate_up_scales: gate_up_scales.contiguous()?,
            down_blocks: down_blocks.contiguous()?,
            down_scales: down_scales.contiguous()?,
        })
    }

    /// Random blocks (every nibble uniform) and scales uniform in `2^-10 ..= 2^-6` (values of
    /// magnitude up to 6·2^-6, root-mean-square ≈ 0.015), generated on `device` — what a benchmark
    /// needs: the memory and the arithmetic of a real checkpoint without reading one.
    pub fn random(
        num_experts: usize,
        hidden: usize,
        intermediate: usize,
        device: &Device,
    ) -> Result<Self> {
        let bytes = |out: usize, inn: usize| -> Result<(Tensor, Tensor)> {
            let g = inn / 32;
            let b = Tensor::rand(0f32, 256f32, (num_experts, out, g, 16), device)?
                .floor()?
                .clamp(0f32, 255f32)?
                .to_dtype(DType::U8)?;
            let s = Tensor::rand(117f32, 122f32, (num_experts, out, g), device)?
                .floor()?
                .clamp(117f32, 121f32)?
                .to_dtype(DType::U8)?;
            Ok((b, s))
        };
        let (gb, gs) = bytes(2 * intermediate, hidden)?;
        let (db, ds) = bytes(hidden, intermediate)?;
        Self::new(gb, gs, db, ds)
    }

    /// The parameter dequantized to `dtype`, as a `[E, in, out]` view (the transpose of the
    /// contiguous `[E, out, in]` result; candle's matmul takes each `[in, out]` slice as a transposed
    /// operand without copying).
    pub fn dequantize(&self, p: ExpertParam, dtype: DType) -> Result<Tensor> {
        self.grouped_weight(p, dtype)
            .dense()
            .map_err(|err| ModelError::mxfp4(p.name(), err))
    }

    /// The parameter as the MoE's grouped matmul takes it: still packed, dequantized to `dtype` one
    /// expert at a time inside the matmul (see [`gptoss_kernels::grouped`]).
    pub(crate) fn grouped_weight(&self, p: ExpertParam, dtype: DType) -> GroupedWeight {
        let (blocks, scales) = self.blocks_and_scales(p);
        GroupedWeight::Packed {
            blocks: blocks.clone(),
            scales: scales.clone(),
            dtype,
            transposed: false,
        }
    }

    /// The `*_blocks` `[E, out, in/32, 16]` and `*_scales` `[E, out, in/32]` (u8) of a parameter, as
    /// the checkpoint stores them.
    pub fn blocks_and_scales(&self, p: ExpertParam) -> (&Tensor, &Tensor) {
        match p {
            ExpertParam::GateUp => (&self.gate_up_blocks, &self.gate_up_scales),
            ExpertParam::Down => (&self.down_blocks, &self.down_scales),
        }
    }

    /// Bytes held on the device.
    pub fn nbytes(&self) -> usize {
        [
            &self.gate_up_blocks,
            &self.gate_up_scales,
            &self.down_blocks,
            &self.down_scales,
        ]
        .iter()
        .map(|t| t.elem_count())
        .sum()
    }
}

/// A zero-storage stand-in `[E, in, out]` for a parameter held packed (a broadcast scalar): it keeps
/// `Experts::param` shapes right for adapter targeting; its values are meaningless.
pub(crate) fn placeholder(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((), dtype, device)?.broadcast_as(shape)?)
}
