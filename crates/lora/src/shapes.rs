//! The gpt-oss module tree as names and shapes only (no weights): what target matching and parameter
//! counting need. Names mirror Hugging Face (`model.layers.{i}.self_attn.q_proj`).

/// The dimensions of a gpt-oss model that determine every module name and parameter shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptOssShapes {
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Model width H.
    pub hidden_size: usize,
    /// Expert width I (gate_up_proj has 2·I outputs).
    pub intermediate_size: usize,
    /// Attention head dimension.
    pub head_dim: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads.
    pub num_key_value_heads: usize,
    /// Number of experts E per layer.
    pub num_local_experts: usize,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Whether lm_head shares the embedding matrix (false for gpt-oss).
    pub tie_word_embeddings: bool,
}

/// Which 3-D expert weight of `model.layers.{i}.mlp.experts` (layout [E, in, out]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExpertWeight {
    /// `gate_up_proj` [E, H, 2I]; registered first, so PEFT makes it the inner wrapper when both are targeted.
    GateUp,
    /// `down_proj` [E, I, H].
    Down,
}

impl ExpertWeight {
    /// Both weights in PEFT's registration order.
    pub const ALL: [ExpertWeight; 2] = [ExpertWeight::GateUp, ExpertWeight::Down];

    /// The HF parameter name.
    pub fn name(self) -> &'static str {
        match self {
            ExpertWeight::GateUp => "gate_up_proj",
            ExpertWeight::Down => "down_proj",
        }
    }
}

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
    pub weight: ExpertWeight,
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
        format!("{}.{}", self.module, self.weight.name())
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

impl GptOssShapes {
    /// gpt-oss-20b (config.json of openai/gpt-oss-20b).
    pub fn gpt_oss_20b() -> Self {
        GptOssShapes {
            num_hidden_layers: 24,
            hidden_size: 2880,
            intermediate_size: 2880,
            head_dim: 64,
            num_attention_heads: 64,
            num_key_value_heads: 8,
            num_local_experts: 32,
            vocab_size: 201088,
            tie_word_embeddings: false,
        }
    }

    /// gpt-oss-120b.
    pub fn gpt_oss_120b() -> Self {
        GptOssShapes {
            num_hidden_layers: 36,
            num_local_experts: 128,
            ..Self::gpt_oss_20b()
        }
    }

    /// Every module in `named_modules()` order (root excluded), with its kind.
    pub fn modules(&self) -> Vec<(String, ModuleKind)> {
        let mut out = vec![
            ("model".to_string(), ModuleKind::Other),
            ("model.embed_tokens".to_string(), ModuleKind::Embedding),
            ("model.layers".to_string(), ModuleKind::Other),
        ];
        for i in 0..self.num_hidden_layers {
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

    /// Shape of the linear module `name`, if it is one.
    pub fn linear(&self, name: &str) -> Option<LinearShape> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let (in_features, out_features) = if name == "lm_head" {
            (h, self.vocab_size)
        } else {
            let rest = name.strip_prefix("model.layers.")?;
            let (idx, proj) = rest.split_once(".self_attn.")?;
            if idx.parse::<usize>().ok()? >= self.num_hidden_layers {
                return None;
            }
            match proj {
                "q_proj" => (h, q),
                "k_proj" | "v_proj" => (h, kv),
                "o_proj" => (q, h),
                _ => return None,
            }
        };
        Some(LinearShape {
            name: name.to_string(),
            in_features,
            out_features,
        })
    }

    /// Every parameter in `named_parameters()` order with its shape.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i2, e) = (
            self.hidden_size,
            2 * self.intermediate_size,
            self.num_local_experts,
        );
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                if let Some(s) = self.linear(&format!("{p}.self_attn.{proj}")) {
                    out.push((
                        format!("{p}.self_attn.{proj}.weight"),
                        vec![s.out_features, s.in_features],
                    ));
                    out.push((format!("{p}.self_attn.{proj}.bias"), vec![s.out_features]));
                }
            }
            out.push((
                format!("{p}.self_attn.sinks"),
                vec![self.num_attention_heads],
            ));
            out.push((format!("{p}.mlp.router.weight"), vec![e, h]));
            out.push((format!("{p}.mlp.router.bias"), vec![e]));
            out.push((format!("{p}.mlp.experts.gate_up_proj"), vec![e, h, i2]));
            out.push((format!("{p}.mlp.experts.gate_up_proj_bias"), vec![e, i2]));
            out.push((
                format!("{p}.mlp.experts.down_proj"),
                vec![e, self.intermediate_size, h],
            ));
            out.push((format!("{p}.mlp.experts.down_proj_bias"), vec![e, h]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// The expert weight a parameter name denotes, if it is one.
    pub fn expert(&self, param_name: &str) -> Option<ExpertShape> {
        let rest = param_name.strip_prefix("model.layers.")?;
        let (idx, w) = rest.split_once(".mlp.experts.")?;
        if idx.parse::<usize>().ok()? >= self.num_hidden_layers {
            return None;
        }
        let (weight, in_features, out_features) = match w {
            "gate_up_proj" => (
                ExpertWeight::GateUp,
                self.hidden_size,
                2 * self.intermediate_size,
            ),
            "down_proj" => (ExpertWeight::Down, self.intermediate_size, self.hidden_size),
            _ => return None,
        };
        Some(ExpertShape {
            module: format!("model.layers.{idx}.mlp.experts"),
            weight,
            num_experts: self.num_local_experts,
            in_features,
            out_features,
        })
    }

    /// Total number of base-model parameters (the sum over [`parameters`](Self::parameters)).
    pub fn num_parameters(&self) -> u64 {
        self.parameters()
            .iter()
            .map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }
}

// MODEL-CONFIG-FROM

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_oss_20b_parameter_count_matches_transformers() {
        // transformers 5.24 on the meta device (reference.md §1).
        assert_eq!(GptOssShapes::gpt_oss_20b().num_parameters(), 20_914_757_184);
        assert_eq!(
            GptOssShapes::gpt_oss_120b().num_parameters(),
            116_829_156_672
        );
    }
}
