//! Target matching with PEFT 0.21.2 semantics, from names and shapes alone.
//!
//! - `target_modules` as a list: a module matches an entry when its name equals it or ends with `"." + entry`
//!   (`tuners_utils.check_target_module_exists`); `layers_to_transform` / `layers_pattern` then filter by layer.
//! - `target_modules` as a string: `"all-linear"` (every `nn.Linear` except the output head `lm_head`; for gpt-oss
//!   q/k/v/o_proj of every layer, never the router, experts or lm_head), otherwise a regex that must match the
//!   whole module name.
//! - `exclude_modules` (regex or list) wins over every target.
//! - `target_parameters`: a parameter matches when its full name equals the entry or ends with `"." + entry`
//!   (`"7.mlp.experts.gate_up_proj"`). Two targeted weights of one experts module nest: gate_up_proj (registered
//!   first) is the inner wrapper, so its adapter keys carry a `base_layer.` infix.
//! - `rank_pattern` / `alpha_pattern`: the first key (sorted) matching `^(.*\.)?(key)$` on the module name (or
//!   the full parameter name for expert weights) overrides r / lora_alpha.
//!
//! Unlike PEFT, every single entry must match something: a typo in one entry (or an expert target on a layer
//! that does not exist) is an error, not a silently untrained adapter.

use regex::Regex;

use crate::config::{LoraConfig, TargetModules};
use crate::error::{LoraError, Result};
use gptoss_model::{Config, ExpertParam};

use crate::shapes::{ExpertShape, LinearShape, ModelShapes, ModuleKind};

/// Prefix PEFT puts in front of module names in adapter files (`PeftModel.base_model.model`).
pub const PEFT_KEY_PREFIX: &str = "base_model.model.";

/// One linear module to adapt.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearTarget {
    /// The module and its shape.
    pub shape: LinearShape,
    /// Rank (after `rank_pattern`).
    pub r: usize,
    /// lora_alpha (after `alpha_pattern`).
    pub alpha: f64,
    /// Output scaling: alpha / r (or alpha / √r with rslora).
    pub scaling: f64,
}

/// One expert weight to adapt (PEFT `ParamWrapper`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertTarget {
    /// The weight and its shape.
    pub shape: ExpertShape,
    /// Rank per expert (after `rank_pattern`).
    pub r: usize,
    /// lora_alpha (after `alpha_pattern`).
    pub alpha: f64,
    /// Output scaling.
    pub scaling: f64,
    /// True when this wrapper is nested inside another one on the same module (gate_up_proj when down_proj is
    /// targeted too): its adapter keys then read `...experts.base_layer.lora_A.weight`.
    pub nested: bool,
}

/// Which LoRA factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// lora_A, `[r, in]` (linear) or `[r·E, in]` (experts).
    A,
    /// lora_B, `[out, r]` (linear) or `[out, r·E]` (experts).
    B,
}

impl Factor {
    fn name(self) -> &'static str {
        match self {
            Factor::A => "lora_A",
            Factor::B => "lora_B",
        }
    }
}

impl LinearTarget {
    /// The adapter-file key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub fn key(&self, f: Factor) -> String {
        format!("{PEFT_KEY_PREFIX}{}.{}.weight", self.shape.name, f.name())
    }

    /// Shape of a factor: A `[r, in]`, B `[out, r]`.
    pub fn factor_shape(&self, f: Factor) -> Vec<usize> {
        match f {
            Factor::A => vec![self.r, self.shape.in_features],
            Factor::B => vec![self.shape.out_features, self.r],
        }
    }

    /// Trainable parameters: r·(in + out).
    pub fn num_params(&self) -> u64 {
        (self.r * (self.shape.in_features + self.shape.out_features)) as u64
    }
}

impl ExpertTarget {
    /// The adapter-file key: `base_model.model.model.layers.7.mlp.experts[.base_layer].lora_A.weight`.
    pub fn key(&self, f: Factor) -> String {
        let infix = if self.nested { "base_layer." } else { "" };
        format!(
            "{PEFT_KEY_PREFIX}{}.{infix}{}.weight",
            self.shape.module,
            f.name()
        )
    }

    /// Shape of a factor: A `[r·E, in]`, B `[out, r·E]`.
    pub fn factor_shape(&self, f: Factor) -> Vec<usize> {
        let re = self.r * self.shape.num_experts;
        match f {
            Factor::A => vec![re, self.shape.in_features],
            Factor::B => vec![self.shape.out_features, re],
        }
    }

    /// Trainable parameters: r·E·(in + out).
    pub fn num_params(&self) -> u64 {
        (self.r * self.shape.num_experts * (self.shape.in_features + self.shape.out_features))
            as u64
    }
}

/// The resolved set of adapters for one model and one config.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetPlan {
    /// Linear adapters, in module order.
    pub linears: Vec<LinearTarget>,
    /// Expert adapters, in parameter order (gate_up before down within a layer).
    pub experts: Vec<ExpertTarget>,
    /// Base-model parameter count.
    pub base_params: u64,
}

impl TargetPlan {
    /// Total trainable (LoRA) parameters.
    pub fn trainable_params(&self) -> u64 {
        self.linears
            .iter()
            .map(LinearTarget::num_params)
            .sum::<u64>()
            + self
                .experts
                .iter()
                .map(ExpertTarget::num_params)
                .sum::<u64>()
    }

    /// All parameters of the adapted model (base + LoRA), as PEFT counts them.
    pub fn all_params(&self) -> u64 {
        self.base_params + self.trainable_params()
    }

    /// PEFT's `print_trainable_parameters` line, e.g.
    /// `trainable params: 15,040,512 || all params: 20,929,797,696 || trainable%: 0.0719`.
    pub fn trainable_parameters_line(&self) -> String {
        let (t, all) = (self.trainable_params(), self.all_params());
        let pct = if all == 0 {
            0.0
        } else {
            100.0 * t as f64 / all as f64
        };
        format!(
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(t),
            thousands(all)
        )
    }

    /// Every adapter key with its expected shape, in plan order (linears, then experts; A before B).
    pub fn expected_keys(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for t in &self.linears {
            for f in [Factor::A, Factor::B] {
                out.push((t.key(f), t.factor_shape(f)));
            }
        }
        for t in &self.experts {
            for f in [Factor::A, Factor::B] {
                out.push((t.key(f), t.factor_shape(f)));
            }
        }
        out
    }

    /// The resolved `target_modules` PEFT writes into a saved adapter_config.json: full module names (sorted).
    pub fn resolved_target_modules(&self) -> Vec<String> {
        let mut v: Vec<String> = self.linears.iter().map(|t| t.shape.name.clone()).collect();
        v.sort();
        v
    }

    /// A per-module report: one line per adapted module or expert weight, then the totals line.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for t in &self.linears {
            s.push_str(&format!(
                "{:<48} linear  in {:>6} out {:>6}  r {:>3}  scaling {:<8} A {:?} B {:?}  params {}\n",
                t.shape.name,
                t.shape.in_features,
                t.shape.out_features,
                t.r,
                t.scaling,
                t.factor_shape(Factor::A),
                t.factor_shape(Factor::B),
                thousands(t.num_params())
            ));
        }
        for t in &self.experts {
            s.push_str(&format!(
                "{:<48} experts in {:>6} out {:>6}  r {:>3}  scaling {:<8} A {:?} B {:?}  params {}  E {}{}\n",
                t.shape.param_name(),
                t.shape.in_features,
                t.shape.out_features,
                t.r,
                t.scaling,
                t.factor_shape(Factor::A),
                t.factor_shape(Factor::B),
                thousands(t.num_params()),
                t.shape.num_experts,
                if t.nested { "  (nested: base_layer)" } else { "" }
            ));
        }
        s.push_str(&self.trainable_parameters_line());
        s
    }
}

/// The name PEFT gives a LoRA parameter inside the model (`named_parameters()`), with the adapter name:
/// `base_model.model.X.lora_A.weight` → `base_model.model.X.lora_A.default.weight`.
pub fn peft_parameter_name(key: &str, adapter_name: &str) -> String {
    for f in [".lora_A.weight", ".lora_B.weight"] {
        if let Some(stem) = key.strip_suffix(f) {
            let factor = &f[1..7];
            return format!("{stem}.{factor}.{adapter_name}.weight");
        }
    }
    key.to_string()
}

/// `1234567` → `"1,234,567"` (Python's `f"{n:,}"`).
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn compile(field: &'static str, pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|source| LoraError::Regex {
        field,
        pattern: pattern.to_string(),
        source,
    })
}

fn list_matches(list: &[String], key: &str) -> Option<usize> {
    list.iter().position(|t| {
        key == t || (key.ends_with(t.as_str()) && key[..key.len() - t.len()].ends_with('.'))
    })
}

/// The layer index PEFT reads for `layers_to_transform` (first numbered segment after `pattern`).
fn layer_index(key: &str, patterns: &Option<TargetModules>) -> Result<Option<usize>> {
    let pats: Vec<String> = match patterns {
        None => vec![],
        Some(TargetModules::Pattern(p)) if p.is_empty() => vec![],
        Some(TargetModules::Pattern(p)) => vec![p.clone()],
        Some(TargetModules::List(v)) => v.clone(),
    };
    let regexes = if pats.is_empty() {
        vec![
            Regex::new(r"^.*?\.[^.]*\.(\d+)\.").map_err(|source| LoraError::Regex {
                field: "layers_pattern",
                pattern: String::new(),
                source,
            })?,
        ]
    } else {
        pats.iter()
            .map(|p| {
                Regex::new(&format!(r"^(?:|.*?\.){p}\.(\d+)\.")).map_err(|source| {
                    LoraError::Regex {
                        field: "layers_pattern",
                        pattern: p.clone(),
                        source,
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    for re in &regexes {
        if let Some(c) = re.captures(key) {
            return Ok(c.get(1).and_then(|m| m.as_str().parse().ok()));
        }
    }
    Ok(None)
}

fn pattern_value<T: Copy>(
    patterns: &std::collections::BTreeMap<String, T>,
    key: &str,
) -> Result<Option<T>> {
    for (p, v) in patterns {
        let re =
            Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).map_err(|source| LoraError::Regex {
                field: "rank_pattern/alpha_pattern",
                pattern: p.clone(),
                source,
            })?;
        if re.is_match(key) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

fn rank_alpha(cfg: &LoraConfig, key: &str) -> Result<(usize, f64, f64)> {
    let r = pattern_value(&cfg.rank_pattern, key)?.unwrap_or(cfg.r);
    let alpha = pattern_value(&cfg.alpha_pattern, key)?.unwrap_or(cfg.lora_alpha);
    Ok((r, alpha, cfg.scaling_for(r, alpha)))
}

/// Module matcher for `target_modules`.
enum ModuleMatcher {
    AllLinear,
    Regex(Regex, String),
    List(Vec<String>),
}

/// Resolves `cfg` against the model `config` describes (shapes only; nothing is allocated). Validates the
/// config first. Errors when an entry of `target_modules` / `target_parameters` matches nothing, or matches
/// something LoRA cannot adapt here.
pub fn resolve_targets(cfg: &LoraConfig, config: &Config) -> Result<TargetPlan> {
    cfg.validate()?;
    let shapes = &ModelShapes::new(config);
    let exclude = match &cfg.exclude_modules {
        None => None,
        Some(TargetModules::Pattern(p)) => Some(ModuleMatcher::Regex(
            compile("exclude_modules", p)?,
            p.clone(),
        )),
        Some(TargetModules::List(v)) => Some(ModuleMatcher::List(v.clone())),
    };
    let matcher = match &cfg.target_modules {
        None => None,
        Some(t) if t.is_all_linear() => Some(ModuleMatcher::AllLinear),
        Some(TargetModules::Pattern(p)) => Some(ModuleMatcher::Regex(
            compile("target_modules", p)?,
            p.clone(),
        )),
        Some(TargetModules::List(v)) => Some(ModuleMatcher::List(v.clone())),
    };

    let mut linears = Vec::new();
    if let Some(matcher) = &matcher {
        let n_entries = match matcher {
            ModuleMatcher::List(v) => v.len(),
            _ => 1,
        };
        let mut entry_hit = vec![false; n_entries];
        for (name, kind) in shapes.modules() {
            let excluded = match &exclude {
                Some(ModuleMatcher::Regex(re, _)) => re.is_match(&name),
                Some(ModuleMatcher::List(v)) => list_matches(v, &name).is_some(),
                _ => false,
            };
            if excluded {
                continue;
            }
            // layers_to_transform only filters list targets (PEFT rejects it with a string target_modules)
            let (hit, layer_filtered) = match matcher {
                ModuleMatcher::AllLinear => (
                    (kind == ModuleKind::Linear && name != "lm_head").then_some(0),
                    false,
                ),
                ModuleMatcher::Regex(re, _) => (re.is_match(&name).then_some(0), false),
                ModuleMatcher::List(v) => (list_matches(v, &name), true),
            };
            let hit = match (hit, &cfg.layers_to_transform) {
                (Some(i), Some(layers)) if layer_filtered => {
                    match layer_index(&name, &cfg.layers_pattern)? {
                        Some(l) if layers.contains(l) => Some(i),
                        _ => None,
                    }
                }
                (hit, _) => hit,
            };
            let Some(entry) = hit else { continue };
            let entry_text = match matcher {
                ModuleMatcher::List(v) => v[entry].clone(),
                ModuleMatcher::Regex(_, p) => p.clone(),
                ModuleMatcher::AllLinear => crate::config::ALL_LINEAR.to_string(),
            };
            let shape = match kind {
                ModuleKind::Linear => shapes.linear(&name),
                _ => None,
            };
            let Some(shape) = shape else {
                return Err(LoraError::UnsupportedTarget {
                    field: "target_modules",
                    target: entry_text,
                    name,
                    reason: match kind {
                        ModuleKind::Embedding => "LoRA on embeddings is not implemented",
                        _ => "only nn.Linear modules can be targeted by target_modules (use target_parameters for experts)",
                    },
                });
            };
            entry_hit[entry] = true;
            let (r, alpha, scaling) = rank_alpha(cfg, &name)?;
            linears.push(LinearTarget {
                shape,
                r,
                alpha,
                scaling,
            });
        }
        if let Some(i) = entry_hit.iter().position(|h| !h) {
            let target = match (&cfg.target_modules, matcher) {
                (_, ModuleMatcher::List(v)) => v[i].clone(),
                (Some(TargetModules::Pattern(p)), _) => p.clone(),
                _ => String::new(),
            };
            return Err(LoraError::TargetNotFound {
                field: "target_modules",
                target,
                what: "linear module",
                example: "model.layers.0.self_attn.q_proj".into(),
            });
        }
    }

    let mut experts: Vec<ExpertTarget> = Vec::new();
    if let Some(targets) = cfg.target_parameters.as_ref().filter(|v| !v.is_empty()) {
        let mut entry_hit = vec![false; targets.len()];
        for name in shapes.parameter_names() {
            let Some(entry) = list_matches(targets, name) else {
                continue;
            };
            let Some(shape) = shapes.expert(name) else {
                return Err(LoraError::UnsupportedTarget {
                    field: "target_parameters",
                    target: targets[entry].clone(),
                    name: name.to_string(),
                    reason: "only the 3-D expert weights mlp.experts.gate_up_proj / down_proj can be targeted",
                });
            };
            entry_hit[entry] = true;
            let (r, alpha, scaling) = rank_alpha(cfg, name)?;
            experts.push(ExpertTarget {
                shape,
                r,
                alpha,
                scaling,
                nested: false,
            });
        }
        if let Some(i) = entry_hit.iter().position(|h| !h) {
            return Err(LoraError::TargetNotFound {
                field: "target_parameters",
                target: targets[i].clone(),
                what: "expert parameter",
                example: format!(
                    "{}.mlp.experts.gate_up_proj (layers 0..{})",
                    shapes.num_layers().saturating_sub(1),
                    shapes.num_layers()
                ),
            });
        }
        // Nesting: within one experts module the first-registered weight (gate_up_proj) is the inner wrapper.
        let modules: Vec<String> = experts.iter().map(|t| t.shape.module.clone()).collect();
        for t in experts.iter_mut() {
            let both = modules.iter().filter(|m| **m == t.shape.module).count() > 1;
            t.nested = both && t.shape.param == ExpertParam::GateUp;
        }
    }

    Ok(TargetPlan {
        linears,
        experts,
        base_params: shapes.num_parameters(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(target_modules: Option<TargetModules>, params: &[&str]) -> LoraConfig {
        LoraConfig {
            target_modules,
            target_parameters: (!params.is_empty())
                .then(|| params.iter().map(|s| s.to_string()).collect()),
            ..LoraConfig::default()
        }
    }

    #[test]
    fn cookbook_count_and_line_match_peft() {
        let plan = resolve_targets(&LoraConfig::cookbook(), &Config::gpt_oss_20b()).unwrap();
        assert_eq!(plan.linears.len(), 96);
        assert_eq!(plan.experts.len(), 6);
        assert_eq!(plan.trainable_params(), 15_040_512);
        assert_eq!(
            plan.trainable_parameters_line(),
            "trainable params: 15,040,512 || all params: 20,929,797,696 || trainable%: 0.0719"
        );
        let report = plan.report();
        assert_eq!(report.lines().count(), 96 + 6 + 1);
        assert!(report.contains("model.layers.7.mlp.experts.gate_up_proj"));
        assert!(report
            .lines()
            .last()
            .unwrap()
            .starts_with("trainable params: 15,040,512"));
        assert_eq!(
            peft_parameter_name(&plan.experts[0].key(Factor::A), "default"),
            "base_model.model.model.layers.7.mlp.experts.base_layer.lora_A.default.weight"
        );
    }

    #[test]
    fn all_linear_is_attention_only() {
        let plan = resolve_targets(
            &cfg(Some(TargetModules::all_linear()), &[]),
            &Config::gpt_oss_20b(),
        )
        .unwrap();
        assert!(plan
            .linears
            .iter()
            .all(|t| t.shape.name.contains(".self_attn.")));
        assert_eq!(plan.linears.len(), 4 * 24);
        assert!(plan.experts.is_empty());
    }

    #[test]
    fn suffix_matching_needs_a_dot_boundary() {
        let s = Config::gpt_oss_20b();
        let plan = resolve_targets(&cfg(Some(TargetModules::list(["q_proj"])), &[]), &s).unwrap();
        assert_eq!(plan.linears.len(), 24);
        let e = resolve_targets(&cfg(Some(TargetModules::list(["_proj"])), &[]), &s).unwrap_err();
        assert!(matches!(e, LoraError::TargetNotFound { .. }), "{e}");
        let plan = resolve_targets(&cfg(Some(TargetModules::list(["lm_head"])), &[]), &s).unwrap();
        assert_eq!(plan.linears[0].shape.out_features, 201088);
    }

    #[test]
    fn every_entry_must_match() {
        let s = Config::gpt_oss_20b();
        let e = resolve_targets(
            &cfg(Some(TargetModules::list(["q_proj", "qproj"])), &[]),
            &s,
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"qproj\""), "{e}");
        let e = resolve_targets(&cfg(None, &["24.mlp.experts.gate_up_proj"]), &s).unwrap_err();
        assert!(e.to_string().contains("24.mlp.experts.gate_up_proj"), "{e}");
        let e = resolve_targets(&cfg(None, &["mlp.experts.gate_proj"]), &s).unwrap_err();
        assert!(matches!(e, LoraError::TargetNotFound { .. }), "{e}");
    }

    #[test]
    fn non_linear_targets_are_rejected() {
        let s = Config::gpt_oss_20b();
        for t in ["router", "experts", "embed_tokens", "mlp"] {
            let e = resolve_targets(&cfg(Some(TargetModules::list([t])), &[]), &s).unwrap_err();
            assert!(matches!(e, LoraError::UnsupportedTarget { .. }), "{t}: {e}");
        }
        let e = resolve_targets(&cfg(None, &["mlp.router.weight"]), &s).unwrap_err();
        assert!(matches!(e, LoraError::UnsupportedTarget { .. }), "{e}");
    }

    #[test]
    fn regex_exclude_layers_and_patterns() {
        let s = Config::gpt_oss_20b();
        let mut c = cfg(Some(TargetModules::Pattern(r".*\.(q|v)_proj".into())), &[]);
        c.exclude_modules = Some(TargetModules::list(["model.layers.0.self_attn.q_proj"]));
        c.rank_pattern.insert("v_proj".into(), 16);
        c.alpha_pattern
            .insert(r"layers\.1\.self_attn\.q_proj".into(), 64.0);
        let plan = resolve_targets(&c, &s).unwrap();
        assert_eq!(plan.linears.len(), 47);
        let v = plan
            .linears
            .iter()
            .find(|t| t.shape.name.ends_with("0.self_attn.v_proj"))
            .unwrap();
        assert_eq!((v.r, v.scaling), (16, 0.5));
        let q1 = plan
            .linears
            .iter()
            .find(|t| t.shape.name == "model.layers.1.self_attn.q_proj")
            .unwrap();
        assert_eq!((q1.r, q1.scaling), (8, 8.0));

        let mut c = cfg(Some(TargetModules::list(["k_proj"])), &[]);
        c.layers_to_transform = Some(crate::config::LayerIndices::List(vec![3, 5]));
        c.layers_pattern = Some(TargetModules::Pattern("layers".into()));
        let plan = resolve_targets(&c, &s).unwrap();
        let names: Vec<_> = plan.linears.iter().map(|t| t.shape.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.layers.3.self_attn.k_proj",
                "model.layers.5.self_attn.k_proj"
            ]
        );
        // as in PEFT's LoraConfig.__post_init__
        c.target_modules = Some(TargetModules::all_linear());
        let e = resolve_targets(&c, &s).unwrap_err();
        assert!(
            matches!(
                e,
                LoraError::InvalidConfig {
                    field: "layers_to_transform",
                    ..
                }
            ),
            "{e}"
        );
        c.target_modules = Some(TargetModules::list(["k_proj"]));
        c.layers_to_transform = None;
        let e = resolve_targets(&c, &s).unwrap_err();
        assert!(
            matches!(
                e,
                LoraError::InvalidConfig {
                    field: "layers_pattern",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn expert_keys_nest_like_peft() {
        let s = Config::gpt_oss_20b();
        // Config order does not matter: gate_up_proj is always the inner (base_layer) wrapper.
        let plan = resolve_targets(
            &cfg(
                None,
                &[
                    "7.mlp.experts.down_proj",
                    "7.mlp.experts.gate_up_proj",
                    "15.mlp.experts.down_proj",
                ],
            ),
            &s,
        )
        .unwrap();
        let keys: Vec<String> = plan.expected_keys().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "base_model.model.model.layers.7.mlp.experts.base_layer.lora_A.weight",
                "base_model.model.model.layers.7.mlp.experts.base_layer.lora_B.weight",
                "base_model.model.model.layers.7.mlp.experts.lora_A.weight",
                "base_model.model.model.layers.7.mlp.experts.lora_B.weight",
                "base_model.model.model.layers.15.mlp.experts.lora_A.weight",
                "base_model.model.model.layers.15.mlp.experts.lora_B.weight",
            ]
        );
        assert_eq!(plan.expected_keys()[0].1, vec![256, 2880]);
        assert_eq!(plan.expected_keys()[1].1, vec![5760, 256]);
        assert_eq!(plan.expected_keys()[5].1, vec![2880, 256]);
    }

    /// Ranks and scalings PEFT 0.21.2 produced for this config on the fixture model (tiny-base), printed from
    /// its LoraLayer modules: (name, r, scaling, lora_A shape).
    #[test]
    fn rank_and_alpha_patterns_match_peft() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-base/config.json");
        let model = Config::from_file(path).unwrap();
        let mut c = cfg(
            Some(TargetModules::list(["q_proj"])),
            &["down_proj", "0.mlp.experts.gate_up_proj"],
        );
        c.r = 4;
        c.lora_alpha = 8.0;
        c.use_rslora = true;
        c.rank_pattern.insert("layers.1.self_attn.q_proj".into(), 2);
        c.rank_pattern.insert("gate_up_proj".into(), 3);
        c.alpha_pattern.insert("q_proj".into(), 4.0);
        c.alpha_pattern
            .insert("1.mlp.experts.down_proj".into(), 6.0);
        let plan = resolve_targets(&c, &model).unwrap();
        let got: Vec<(String, usize, f64, Vec<usize>)> = plan
            .linears
            .iter()
            .map(|t| {
                (
                    t.shape.name.clone(),
                    t.r,
                    t.scaling,
                    t.factor_shape(Factor::A),
                )
            })
            .chain(plan.experts.iter().map(|t| {
                (
                    t.shape.param_name(),
                    t.r,
                    t.scaling,
                    t.factor_shape(Factor::A),
                )
            }))
            .collect();
        let want: Vec<(String, usize, f64, Vec<usize>)> = vec![
            (
                "model.layers.0.self_attn.q_proj".into(),
                4,
                2.0,
                vec![4, 32],
            ),
            (
                "model.layers.1.self_attn.q_proj".into(),
                2,
                2.82842712474619,
                vec![2, 32],
            ),
            (
                "model.layers.0.mlp.experts.gate_up_proj".into(),
                3,
                4.618802153517007,
                vec![12, 32],
            ),
            (
                "model.layers.0.mlp.experts.down_proj".into(),
                4,
                4.0,
                vec![16, 16],
            ),
            (
                "model.layers.1.mlp.experts.down_proj".into(),
                4,
                3.0,
                vec![16, 16],
            ),
        ];
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.0, g.1, &g.3), (&w.0, w.1, &w.3));
            assert!((g.2 - w.2).abs() < 1e-12, "{}: {} vs {}", g.0, g.2, w.2);
        }
        assert!(plan.experts[0].nested && !plan.experts[1].nested && !plan.experts[2].nested);
    }

    #[test]
    fn rslora_scaling() {
        let mut c = cfg(Some(TargetModules::list(["q_proj"])), &[]);
        c.r = 16;
        c.lora_alpha = 32.0;
        c.use_rslora = true;
        let plan = resolve_targets(&c, &Config::gpt_oss_20b()).unwrap();
        assert_eq!(plan.linears[0].scaling, 8.0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(20_929_797_696), "20,929,797,696");
    }
}
