//! The list of parameters (HF names and shapes) a config implies: the one source for loading, saving,
//! random init and parameter counting.

use candle_core::{DType, Device, Tensor};

use crate::attention::Attention;
use crate::config::Config;
use crate::error::Result;
use crate::linear::Linear;
use crate::model::{DecoderLayer, GptOssForCausalLM, GptOssModel};
use crate::moe::{Experts, MoeMlp, Router};
use crate::norm::RmsNorm;

/// What a parameter is, for initialisation and checkpoint formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A matrix initialised N(0, initializer_range) (linear weights, embeddings, router weight).
    Weight,
    /// A bias initialised to zero.
    Bias,
    /// A vector initialised N(0, initializer_range) (sinks, router bias).
    Normal,
    /// An RMSNorm weight initialised to one.
    Norm,
    /// A 3-D expert weight `[E, in, out]` (stored as MXFP4 `_blocks`/`_scales` in quantized checkpoints).
    Expert,
}

/// One parameter: HF name, shape, kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// HF name, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
    pub name: String,
    /// Shape in the transformers parameter layout.
    pub shape: Vec<usize>,
    /// Kind.
    pub kind: ParamKind,
}

fn spec(name: String, shape: Vec<usize>, kind: ParamKind) -> TensorSpec {
    TensorSpec { name, shape, kind }
}

/// Every parameter of `config` in HF order (embed, layers, norm, lm_head unless tied).
pub fn tensor_specs(config: &Config) -> Vec<TensorSpec> {
    use ParamKind::*;
    let (h, v, d) = (config.hidden_size, config.vocab_size, config.head_dim());
    let (nh, nkv, e, i) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.num_local_experts,
        config.intermediate_size,
    );
    let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, h], Weight)];
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push(spec(format!("{p}.input_layernorm.weight"), vec![h], Norm));
        for (n, o) in [("q_proj", nh * d), ("k_proj", nkv * d), ("v_proj", nkv * d)] {
            out.push(spec(
                format!("{p}.self_attn.{n}.weight"),
                vec![o, h],
                Weight,
            ));
            if config.attention_bias {
                out.push(spec(format!("{p}.self_attn.{n}.bias"), vec![o], Bias));
            }
        }
        out.push(spec(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, nh * d],
            Weight,
        ));
        if config.attention_bias {
            out.push(spec(format!("{p}.self_attn.o_proj.bias"), vec![h], Bias));
        }
        out.push(spec(format!("{p}.self_attn.sinks"), vec![nh], Normal));
        out.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Norm,
        ));
        out.push(spec(format!("{p}.mlp.router.weight"), vec![e, h], Weight));
        out.push(spec(format!("{p}.mlp.router.bias"), vec![e], Normal));
        out.push(spec(
            format!("{p}.mlp.experts.gate_up_proj"),
            vec![e, h, 2 * i],
            Expert,
        ));
        out.push(spec(
            format!("{p}.mlp.experts.gate_up_proj_bias"),
            vec![e, 2 * i],
            Bias,
        ));
        out.push(spec(
            format!("{p}.mlp.experts.down_proj"),
            vec![e, i, h],
            Expert,
        ));
        out.push(spec(
            format!("{p}.mlp.experts.down_proj_bias"),
            vec![e, h],
            Bias,
        ));
    }
    out.push(spec("model.norm.weight".into(), vec![h], Norm));
    if !config.tie_word_embeddings {
        out.push(spec("lm_head.weight".into(), vec![v, h], Weight));
    }
    out
}

/// Number of parameters implied by the config's shapes (experts counted dequantized).
/// `Config::gpt_oss_20b()` → 20,914,757,184; `gpt_oss_120b()` → 116,829,156,672.
pub fn num_parameters(config: &Config) -> u64 {
    tensor_specs(config)
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum()
}

/// Assemble a model, asking `get` for each parameter of [`tensor_specs`] (already in `dtype` on `device`).
pub(crate) fn build_model(
    config: &Config,
    dtype: DType,
    device: &Device,
    mut get: impl FnMut(&TensorSpec) -> Result<Tensor>,
) -> Result<GptOssForCausalLM> {
    config.validate()?;
    let specs = tensor_specs(config);
    let mut it = specs.iter();
    let mut next = |expect: &str| -> Result<Tensor> {
        match it.next() {
            Some(s) if s.name.ends_with(expect) => get(s),
            _ => Err(crate::error::ModelError::arg(
                "spec",
                format!("internal parameter order broken at {expect}"),
            )),
        }
    };
    let types = config.layer_types();
    let embed = next("embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for &layer_type in types.iter().take(config.num_hidden_layers) {
        let input_layernorm = RmsNorm::new(next("input_layernorm.weight")?, config.rms_norm_eps);
        let mut lin = |n: &str| -> Result<Linear> {
            let w = next(&format!("{n}.weight"))?;
            let b = if config.attention_bias {
                Some(next(&format!("{n}.bias"))?)
            } else {
                None
            };
            Ok(Linear::new(w, b))
        };
        let (q_proj, k_proj, v_proj, o_proj) = (
            lin("q_proj")?,
            lin("k_proj")?,
            lin("v_proj")?,
            lin("o_proj")?,
        );
        let self_attn = Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            sinks: next("sinks")?,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim(),
            layer_type,
        };
        let post_attention_layernorm = RmsNorm::new(
            next("post_attention_layernorm.weight")?,
            config.rms_norm_eps,
        );
        let router = Router {
            weight: next("router.weight")?,
            bias: next("router.bias")?,
            top_k: config.num_experts_per_tok,
        };
        let experts = Experts::new(
            next("gate_up_proj")?,
            next("gate_up_proj_bias")?,
            next("down_proj")?,
            next("down_proj_bias")?,
            config.swiglu_limit,
            config.swiglu_alpha,
        );
        layers.push(DecoderLayer {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp: MoeMlp { router, experts },
        });
    }
    let norm = RmsNorm::new(next("model.norm.weight")?, config.rms_norm_eps);
    let lm_head = if config.tie_word_embeddings {
        embed.clone()
    } else {
        next("lm_head.weight")?
    };
    let model = GptOssModel {
        embed_tokens: embed,
        layers,
        norm,
    };
    GptOssForCausalLM::from_parts(
        config.clone(),
        model,
        Linear::new(lm_head, None),
        dtype,
        device.clone(),
    )
}

/// Every parameter of a model with its HF name (the inverse of [`build_model`]), for saving.
pub fn named_parameters(model: &GptOssForCausalLM) -> Vec<(String, Tensor)> {
    use crate::hooks::ExpertParam;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        model.model.embed_tokens.clone(),
    )];
    for (l, layer) in model.model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.weight().clone(),
        ));
        for (n, lin) in layer.self_attn.projections() {
            out.push((format!("{p}.self_attn.{n}.weight"), lin.weight().clone()));
            if let Some(b) = lin.bias() {
                out.push((format!("{p}.self_attn.{n}.bias"), b.clone()));
            }
        }
        out.push((
            format!("{p}.self_attn.sinks"),
            layer.self_attn.sinks.clone(),
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.weight().clone(),
        ));
        out.push((
            format!("{p}.mlp.router.weight"),
            layer.mlp.router.weight.clone(),
        ));
        out.push((
            format!("{p}.mlp.router.bias"),
            layer.mlp.router.bias.clone(),
        ));
        let x = &layer.mlp.experts;
        for ep in [ExpertParam::GateUp, ExpertParam::Down] {
            out.push((
                format!("{p}.mlp.experts.{}", ep.name()),
                x.param(ep).clone(),
            ));
            out.push((
                format!("{p}.mlp.experts.{}_bias", ep.name()),
                x.bias(ep).clone(),
            ));
        }
    }
    out.push((
        "model.norm.weight".to_string(),
        model.model.norm.weight().clone(),
    ));
    if !model.config().tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), model.lm_head.weight().clone()));
    }
    out
}

/// A copy of `model` whose every parameter is `f(hf_name, tensor)` (same shape), e.g. each
/// wrapped in a `candle_core::Var` for full-parameter training: the returned model computes with
/// the tensors `f` returned, so updating them in place (`Var::set`) updates the model. Adapters
/// are not carried over; tied embeddings stay tied (`f` sees `model.embed_tokens.weight` once).
///
/// # Errors
/// [`crate::ModelError::InvalidArgument`] for MXFP4-resident experts (their dense parameters are placeholders;
/// load with dequantized experts) or when `f` changes a shape; `f`'s own errors.
pub fn map_parameters(
    model: &GptOssForCausalLM,
    mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>,
) -> Result<GptOssForCausalLM> {
    if let Some(i) = model
        .model
        .layers
        .iter()
        .position(|l| l.mlp.experts.packed().is_some())
    {
        return Err(crate::error::ModelError::arg(
            &format!("model.layers.{i}.mlp.experts"),
            "the experts are MXFP4-resident; load them dequantized to map their parameters",
        ));
    }
    let mut current: std::collections::HashMap<String, Tensor> =
        named_parameters(model).into_iter().collect();
    build_model(model.config(), model.dtype(), model.device(), |s| {
        let t = current.remove(&s.name).ok_or_else(|| {
            crate::error::ModelError::arg(&s.name, "parameter missing from the model")
        })?;
        let mapped = f(&s.name, &t)?;
        if mapped.dims() != t.dims() {
            return Err(crate::error::ModelError::arg(
                &s.name,
                format!(
                    "mapped to shape {:?}, expected {:?}",
                    mapped.dims(),
                    t.dims()
                ),
            ));
        }
        Ok(mapped)
    })
}
