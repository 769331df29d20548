//! Causal-LM loss (transformers `ForCausalLMLoss`) and the router load-balancing aux loss
//! (`load_balancing_loss_func`).

use candle_core::{DType, Tensor, D};

use crate::error::{ModelError, Result};

/// Label value that is not counted.
pub const IGNORE_INDEX: i64 = -100;

/// How the summed token losses are normalised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossReduction {
    /// Mean over counted (non-ignored) tokens.
    Mean,
    /// Sum divided by a given token count (gradient accumulation's `num_items_in_batch`).
    SumOver(f64),
}

/// Cross-entropy summed over rows: `logits` `[N, V]` (any float dtype, computed in f32), `targets` `[N]` i64
/// (rows equal to −100 are skipped). Returns (sum as an f32 scalar tensor, number of counted rows).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize)> {
    let (n, _v) = logits.dims2()?;
    let targets = targets.to_dtype(DType::I64)?;
    if targets.dims() != [n] {
        return Err(ModelError::arg(
            "targets",
            format!("expected shape [{n}], got {:?}", targets.dims()),
        ));
    }
    let valid = targets.ne(IGNORE_INDEX as f64)?;
    let counted = valid.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    let safe = valid
        .where_cond(&targets, &targets.zeros_like()?)?
        .to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let sum = (picked * valid.to_dtype(DType::F32)?)?.sum_all()?.neg()?;
    Ok((sum, counted))
}

/// Causal-LM loss: `logits` `[B, T, V]`, `labels` `[B, T]` (i64, −100 = ignored). Labels are shifted left by
/// one (position t predicts label t+1; the last position predicts nothing). Returns an f32 scalar tensor.
pub fn causal_lm_loss(
    logits: &Tensor,
    labels: &Tensor,
    reduction: LossReduction,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(ModelError::arg(
            "labels",
            format!("expected shape [{b}, {t}], got {:?}", labels.dims()),
        ));
    }
    let labels = labels.to_dtype(DType::I64)?;
    let shifted = shift_labels(&labels)?;
    let (sum, counted) = cross_entropy_sum(&logits.reshape((b * t, v))?, &shifted.flatten_all()?)?;
    reduce(sum, counted, reduction)
}

/// Apply a reduction to a summed loss over `counted` tokens.
pub fn reduce(sum: Tensor, counted: usize, reduction: LossReduction) -> Result<Tensor> {
    let denom = match reduction {
        LossReduction::Mean => counted as f64,
        LossReduction::SumOver(n) => n,
    };
    Ok((sum / denom)?)
}

/// `labels` `[B, T]` → `[B, T]` i64 with `out[:, t] = labels[:, t+1]` and `out[:, T−1] = −100`.
pub fn shift_labels(labels: &Tensor) -> Result<Tensor> {
    let (b, t) = labels.dims2()?;
    let labels = labels.to_dtype(DType::I64)?;
    let pad = Tensor::full(IGNORE_INDEX, (b, 1), labels.device())?;
    if t == 1 {
        return Ok(pad);
    }
    Ok(Tensor::cat(&[&labels.narrow(1, 1, t - 1)?, &pad], 1)?)
}

/// Router load-balancing loss over all layers: `router_logits` each `[N, E]`, `top_k`, optional
/// `attention_mask` `[B, T]` with `B·T = N` (padding rows excluded). Returns `E · Σ_e f_e·P_e` as an f32 scalar
/// (differentiable through the softmax probabilities).
pub fn router_aux_loss(
    router_logits: &[Tensor],
    top_k: usize,
    attention_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let first = router_logits
        .first()
        .ok_or_else(|| ModelError::arg("router_logits", "no layers"))?;
    let (n, e) = first.dims2()?;
    let dev = first.device();
    let mask = match attention_mask {
        Some(m) => {
            if m.elem_count() != n {
                return Err(ModelError::arg(
                    "attention_mask",
                    format!(
                        "has {} elements, router logits have {n} rows",
                        m.elem_count()
                    ),
                ));
            }
            Some(
                m.to_device(dev)?
                    .flatten_all()?
                    .ne(0f64)?
                    .to_dtype(DType::F32)?
                    .unsqueeze(1)?,
            )
        }
        None => None,
    };
    let experts = Tensor::arange(0u32, e as u32, dev)?.reshape((1, 1, e))?;
    let mut counts = Tensor::zeros(e, DType::F32, dev)?;
    let mut probs = Tensor::zeros(e, DType::F32, dev)?;
    for l in router_logits {
        let dtype = l.dtype();
        let p = candle_nn::ops::softmax(&l.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dtype)?;
        let sel = p
            .detach()
            .arg_sort_last_dim(false)?
            .narrow(1, 0, top_k)?
            .contiguous()?; // [N, k]
        let onehot = sel
            .unsqueeze(2)?
            .broadcast_eq(&experts)?
            .to_dtype(DType::F32)?
            .sum(1)?; // [N, E]
        let pf = p.to_dtype(DType::F32)?;
        let (c, pr) = match &mask {
            Some(m) => (onehot.broadcast_mul(m)?, pf.broadcast_mul(m)?),
            None => (onehot, pf),
        };
        counts = (counts + c.sum(0)?)?;
        probs = (probs + pr.sum(0)?)?;
    }
    let rows = match &mask {
        Some(m) => m.sum_all()?.to_scalar::<f32>()? as f64,
        None => n as f64,
    } * router_logits.len() as f64;
    let f = (counts / rows)?;
    let pm = (probs / rows)?;
    Ok(((f * pm)?.sum_all()? * e as f64)?)
}
