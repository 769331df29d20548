//! The gpt-oss module tree as names and shapes only (no weights), derived from a [`Config`] through the model
//! crate's [`tensor_specs`]: what target matching and parameter counting need. Names mirror Hugging Face
//! (`model.layers.{i}.self_attn.q_proj`).

use gptoss_model::{num_parameters, tensor_specs, Config, ExpertParam, ParamKind, TensorSpec};

/// A linear layer: `y = x·Wᵀ + b`, W [out, in].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearShape {
    /// HF module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
}

/// A 3-D expert weight [E, in, out].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertShape {
    /// The experts module, e.g. `model.layers.7.mlp.experts`.
    pub module: String,
    /// Which weight.
    pub param: ExpertParam,
    /// E.
    pub num_experts: usize,
    /// in (dim 1).
    pub in_features: usize,
    /// out (dim 2).
    pub out_features: usize,
}

impl ExpertShape {
    /// Full parameter name, e.g. `model.layers.7.mlp.experts.gate_up_proj`.
    pub fn param_name(&self) -> String {
        format!("{}.{}", self.module, self.param.name())
    }
}

/// What a module is, for target matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// An `nn.Linear` that LoRA can adapt.
    Linear,
    /// The input embedding (PEFT could adapt it; this crate does not).
    Embedding,
    /// Any other module (containers, norms, the router, the experts block).
    Other,
}

/// Module names, parameter names and shapes of one gpt-oss configuration.
#[derive(Debug, Clone)]
pub struct ModelShapes {
    layers: usize,
    specs: Vec<TensorSpec>,
    base_params: u64,
}

impl ModelShapes {
    /// Shapes of the model `config` describes.
    pub fn new(config: &Config) -> Self {
        ModelShapes {
            layers: config.num_hidden_layers,
            specs: tensor_specs(config),
            base_params: num_parameters(config),
        }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers
    }

    /// Every module in `named_modules()` order (root excluded), with its kind.
    pub fn modules(&self) -> Vec<(String, ModuleKind)> {
        let mut out = vec![
            ("model".to_string(), ModuleKind::Other),
            ("model.embed_tokens".to_string(), ModuleKind::Embedding),
            ("model.layers".to_string(), ModuleKind::Other),
        ];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            out.push((p.clone(), ModuleKind::Other));
            out.push((format!("{p}.self_attn"), ModuleKind::Other));
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                out.push((format!("{p}.self_attn.{proj}"), ModuleKind::Linear));
            }
            for m in [
                "mlp",
                "mlp.router",
                "mlp.experts",
                "input_layernorm",
                "post_attention_layernorm",
            ] {
                out.push((format!("{p}.{m}"), ModuleKind::Other));
            }
        }
        out.push(("model.norm".to_string(), ModuleKind::Other));
        out.push(("model.rotary_emb".to_string(), ModuleKind::Other));
        out.push(("lm_head".to_string(), ModuleKind::Linear));
        out
    }

    /// Shape of the linear module `name` (from its `weight` [out, in]), if it is one.
    pub fn linear(&self, name: &str) -> Option<LinearShape> {
        let is_linear = name == "lm_head"
            || (name.starts_with("model.layers.")
                && ["q_proj", "k_proj", "v_proj", "o_proj"]
                    .iter()
                    .any(|p| name.ends_with(&format!(".self_attn.{p}"))));
        if !is_linear {
            return None;
        }
        let w = format!("{name}.weight");
        let s = self.specs.iter().find(|s| s.name == w)?;
        match s.shape.as_slice() {
            [out, inp] => Some(LinearShape {
                name: name.to_string(),
                in_features: *inp,
                out_features: *out,
            }),
            _ => None,
        }
    }

    /// Every parameter name in the model crate's `tensor_specs` order (gate_up_proj before down_proj).
    pub fn parameter_names(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|s| s.name.as_str())
    }

    /// The expert weight a parameter name denotes, if it is one.
    pub fn expert(&self, param_name: &str) -> Option<ExpertShape> {
        let s = self
            .specs
            .iter()
            .find(|s| s.name == param_name && s.kind == ParamKind::Expert)?;
        let (module, pname) = param_name.rsplit_once('.')?;
        let param = [ExpertParam::GateUp, ExpertParam::Down]
            .into_iter()
            .find(|p| p.name() == pname)?;
        match s.shape.as_slice() {
            [e, inp, out] => Some(ExpertShape {
                module: module.to_string(),
                param,
                num_experts: *e,
                in_features: *inp,
                out_features: *out,
            }),
            _ => None,
        }
    }

    /// Total number of base-model parameters.
    pub fn num_parameters(&self) -> u64 {
        self.base_params
    }
}
