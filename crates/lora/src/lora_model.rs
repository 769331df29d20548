//! [`LoraModel`]: LoRA adapters installed on a [`GptOssForCausalLM`] through the model's hooks; PEFT adapter
//! directories (save / load), merge, unmerge, merge-and-unload.
//!
//! ```no_run
//! use std::path::Path;
//! use candle_core::{DType, Device};
//! use gptoss_lora::{LoraConfig, LoraModel};
//!
//! let mut model = gptoss_model::load("gpt-oss-20b", DType::BF16, &Device::Cpu)?;
//! let lora = LoraModel::new(&mut model, LoraConfig::cookbook(), 42)?;
//! lora.print_trainable_parameters(); // trainable params: 15,040,512 || all params: 20,929,797,696 || ...
//! let vars = lora.trainable_vars(); // (PEFT key, Var) pairs for the optimizer
//! // ... train with model.forward(..) ...
//! lora.save_pretrained(Path::new("adapter"))?;
//! lora.merge_and_unload(&mut model)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{hash_map::Entry, BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use gptoss_model::{
    ExpertAdapter, ExpertParam, GptOssForCausalLM, LinearAdapter, PackedExperts, SaveOptions,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use crate::adapter_file::{read_adapter_tensors, write_adapter_tensors, ADAPTER_WEIGHTS_NAME};
use crate::config::{LoraConfig, TargetModules, PEFT_VERSION};
use crate::error::{LoraError, Result};
use crate::expert::LoraExperts;
use crate::init::init_factors;
use crate::linear::LoraLinear;
use crate::target::{resolve_targets, ExpertTarget, Factor, LinearTarget, TargetPlan};

/// LoRA adapters on one model. The model owns `Arc`s of the adapters (its hooks); this struct owns the same
/// adapters plus the config, so it can list trainable [`Var`]s, save, merge and unmerge. Operations that change
/// the model take it as `&mut`.
#[derive(Debug)]
pub struct LoraModel {
    config: LoraConfig,
    plan: TargetPlan,
    linears: Vec<(LinearTarget, Arc<LoraLinear>)>,
    experts: Vec<(ExpertTarget, Arc<LoraExperts>)>,
    training: Arc<AtomicBool>,
    merged: bool,
    /// The MXFP4-resident weights of the expert modules that merging made dense (by module name),
    /// restored exactly by unmerging.
    resident: HashMap<String, Arc<PackedExperts>>,
}

fn model_err(e: gptoss_model::ModelError) -> LoraError {
    LoraError::Model(e.to_string())
}

impl LoraModel {
    /// Builds fresh adapters for `config` on `model` (PEFT `get_peft_model`): A initialised from a `seed`ed RNG
    /// as PEFT does (`init_lora_weights`), B = 0, all f32 on the model's device; then installs them.
    /// Errors (bad config, a target matching nothing, a model already carrying adapters) leave `model` untouched.
    pub fn new(model: &mut GptOssForCausalLM, config: LoraConfig, seed: u64) -> Result<Self> {
        let plan = resolve_targets(&config, model.config())?;
        let device = model.device().clone();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut factors = BTreeMap::new();
        for t in &plan.linears {
            let (a, b) = init_factors(
                &config.init_lora_weights,
                &mut rng,
                t.r,
                t.r,
                (t.shape.in_features, t.shape.out_features),
                &device,
            )?;
            factors.insert(t.key(Factor::A), a);
            factors.insert(t.key(Factor::B), b);
        }
        for t in &plan.experts {
            let (a, b) = init_factors(
                &config.init_lora_weights,
                &mut rng,
                t.r,
                t.r * t.shape.num_experts,
                (t.shape.in_features, t.shape.out_features),
                &device,
            )?;
            factors.insert(t.key(Factor::A), a);
            factors.insert(t.key(Factor::B), b);
        }
        Self::build(model, config, plan, factors)
    }

    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) onto `model`
    /// (PEFT `PeftModel.from_pretrained`). Everything is checked before anything is installed: the config,
    /// target matching, every key and shape; on error `model` is untouched.
    pub fn from_pretrained(model: &mut GptOssForCausalLM, dir: &Path) -> Result<Self> {
        let config = LoraConfig::from_file(dir)?;
        let plan = resolve_targets(&config, model.config())?;
        let tensors = read_adapter_tensors(&dir.join(ADAPTER_WEIGHTS_NAME), &plan, model.device())?;
        Self::build(model, config, plan, tensors)
    }

    fn build(
        model: &mut GptOssForCausalLM,
        config: LoraConfig,
        plan: TargetPlan,
        factors: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        check_model(model, &plan)?;
        let training = Arc::new(AtomicBool::new(false));
        let (linears, experts) = adapters(&config, &plan, factors, &training)?;
        let me = LoraModel {
            config,
            plan,
            linears,
            experts,
            training,
            merged: false,
            resident: HashMap::new(),
        };
        me.install(model, true);
        Ok(me)
    }

    /// Installs (`on`) or removes the hooks on every targeted module.
    fn install(&self, model: &mut GptOssForCausalLM, on: bool) {
        let by_name: HashMap<&str, &Arc<LoraLinear>> = self
            .linears
            .iter()
            .map(|(t, a)| (t.shape.name.as_str(), a))
            .collect();
        for (name, lin) in model.named_linears_mut() {
            if let Some(a) = by_name.get(name.as_str()) {
                lin.set_adapter(on.then(|| (*a).clone() as Arc<dyn LinearAdapter>));
            }
        }
        for (name, ex) in model.named_experts_mut() {
            for (t, a) in self.experts.iter().filter(|(t, _)| t.shape.module == name) {
                ex.set_adapter(
                    t.shape.param,
                    on.then(|| a.clone() as Arc<dyn ExpertAdapter>),
                );
            }
        }
    }

    /// The config (as given or as read; [`save_pretrained`](Self::save_pretrained) writes the resolved form).
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The resolved targets.
    pub fn plan(&self) -> &TargetPlan {
        &self.plan
    }

    /// Every trainable LoRA parameter with its PEFT adapter-file key
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), A before B, linears then experts.
    /// All are f32 `Var`s on the model's device.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::with_capacity(2 * (self.linears.len() + self.experts.len()));
        for (t, a) in &self.linears {
            out.push((t.key(Factor::A), a.a().clone()));
            out.push((t.key(Factor::B), a.b().clone()));
        }
        for (t, a) in &self.experts {
            out.push((t.key(Factor::A), a.a().clone()));
            out.push((t.key(Factor::B), a.b().clone()));
        }
        out
    }

    /// Switches dropout on (training) or off (evaluation) for every linear adapter.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Number of trainable (LoRA) parameters.
    pub fn trainable_params(&self) -> u64 {
        self.plan.trainable_params()
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_parameters_line(&self) -> String {
        self.plan.trainable_parameters_line()
    }

    /// Prints [`trainable_parameters_line`](Self::trainable_parameters_line) to stdout, as PEFT does.
    pub fn print_trainable_parameters(&self) {
        println!("{}", self.trainable_parameters_line());
    }

    /// The per-module report of what was adapted (see [`TargetPlan::report`]).
    pub fn report(&self) -> String {
        self.plan.report()
    }

    /// Whether the adapters are currently merged into the base weights.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// The adapter tensors under their PEFT keys (f32, current values, detached).
    pub fn adapter_tensors(&self) -> Vec<(String, Tensor)> {
        self.trainable_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect()
    }

    /// The config PEFT writes next to the weights: `inference_mode: true`, this PEFT version, `"all-linear"`
    /// resolved to the full module names, and `auto_mapping` when there is no `task_type`.
    pub fn saved_config(&self) -> LoraConfig {
        saved_config(&self.config, &self.plan)
    }

    /// Writes a PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors` (f32, PEFT keys).
    /// `PeftModel.from_pretrained` loads it.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| LoraError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_adapter_tensors(&dir.join(ADAPTER_WEIGHTS_NAME), &self.adapter_tensors())?;
        self.saved_config().save(dir)
    }

    /// Replaces the adapter values with those of an adapter file (e.g. to resume training), after checking
    /// every key and shape against this model's plan; on error nothing is changed.
    pub fn load_weights(&self, file: &Path) -> Result<()> {
        let device = self
            .linears
            .first()
            .map(|(_, a)| a.a().device().clone())
            .or_else(|| self.experts.first().map(|(_, a)| a.a().device().clone()))
            .unwrap_or(candle_core::Device::Cpu);
        let tensors = read_adapter_tensors(file, &self.plan, &device)?;
        for (key, var) in self.trainable_vars() {
            if let Some(t) = tensors.get(&key) {
                var.set(t)?;
            }
        }
        Ok(())
    }

    /// Adds every ΔW to its base weight (PEFT `merge_adapter`) and removes the hooks, so the forward runs on
    /// merged weights. Linear: `W ← (W_f32 + scaling·B·A)` cast to W's dtype; experts: `W[e] ← W[e] + ΔW[e]` with
    /// ΔW cast to W's dtype first (as PEFT's `ParamWrapper.merge`), one expert at a time. All new weights are
    /// computed before any is written.
    pub fn merge(&mut self, model: &mut GptOssForCausalLM) -> Result<()> {
        if self.merged {
            return Err(LoraError::State("adapters are already merged".into()));
        }
        self.apply_delta(model, 1.0)?;
        self.install(model, false);
        self.merged = true;
        Ok(())
    }

    /// Subtracts every ΔW again (PEFT `unmerge_adapter`) and reinstalls the hooks.
    pub fn unmerge(&mut self, model: &mut GptOssForCausalLM) -> Result<()> {
        if !self.merged {
            return Err(LoraError::State("adapters are not merged".into()));
        }
        self.apply_delta(model, -1.0)?;
        self.install(model, true);
        self.merged = false;
        Ok(())
    }

    /// Merges the adapters into the base weights and removes them (PEFT `merge_and_unload`): `model` becomes a
    /// plain model with merged weights.
    pub fn merge_and_unload(mut self, model: &mut GptOssForCausalLM) -> Result<()> {
        if !self.merged {
            self.merge(model)?;
        }
        Ok(())
    }

    /// Removes the adapters without merging (PEFT `unload`); if merged, unmerges first.
    pub fn unload(mut self, model: &mut GptOssForCausalLM) -> Result<()> {
        if self.merged {
            self.apply_delta(model, -1.0)?;
        }
        self.install(model, false);
        Ok(())
    }

    /// All new weights are computed first, then written; a failing computation changes nothing.
    ///
    /// MXFP4-resident experts (`Experts::packed`) are dequantized, merged and kept dense (merging
    /// into blocks would need a requantization that loses the delta); unmerging (`sign < 0`)
    /// restores their packed weights exactly instead of subtracting.
    fn apply_delta(&mut self, model: &mut GptOssForCausalLM, sign: f64) -> Result<()> {
        let mut new_linear: HashMap<String, Tensor> = HashMap::new();
        {
            let linears: HashMap<String, &mut gptoss_model::Linear> =
                model.named_linears_mut().into_iter().collect();
            for (t, a) in &self.linears {
                let merged = a.merged(linears[&t.shape.name].weight(), sign)?;
                new_linear.insert(t.shape.name.clone(), merged);
            }
        }
        let restore = sign < 0.0;
        let new_expert = self.merged_experts(model, sign)?;
        for (name, lin) in model.named_linears_mut() {
            if let Some(w) = new_linear.remove(&name) {
                lin.set_weight(w).map_err(model_err)?;
            }
        }
        for (name, ex) in model.named_experts_mut() {
            if restore {
                if let Some(p) = self.resident.remove(&name) {
                    ex.set_resident(p).map_err(model_err)?;
                    continue;
                }
            }
            let key = |p: ExpertParam| (name.clone(), p.name());
            if ex.packed().is_some() && new_expert.contains_key(&key(ExpertParam::GateUp)) {
                let (Some(gu), Some(down)) = (
                    new_expert.get(&key(ExpertParam::GateUp)),
                    new_expert.get(&key(ExpertParam::Down)),
                ) else {
                    return Err(LoraError::State(format!(
                        "{name}: both expert weights expected"
                    )));
                };
                if let Some(p) = ex.set_dense(gu.clone(), down.clone()).map_err(model_err)? {
                    self.resident.insert(name.clone(), p);
                }
                continue;
            }
            for (t, _) in self.experts.iter().filter(|(t, _)| t.shape.module == name) {
                if let Some(w) = new_expert.get(&key(t.shape.param)) {
                    ex.set_param(t.shape.param, w.clone()).map_err(model_err)?;
                }
            }
        }
        Ok(())
    }

    /// `W[e] + sign·ΔW[e]` of every targeted expert parameter, by (module, parameter name); for a
    /// module whose experts are MXFP4-resident, both parameters dense (the untargeted one only
    /// dequantized), since the module then goes dense as a whole.
    fn merged_experts(
        &self,
        model: &mut GptOssForCausalLM,
        sign: f64,
    ) -> Result<HashMap<(String, &'static str), Tensor>> {
        let experts: HashMap<String, &mut gptoss_model::Experts> =
            model.named_experts_mut().into_iter().collect();
        let dense = |ex: &gptoss_model::Experts, p: ExpertParam| -> Result<Tensor> {
            match ex.packed() {
                Some(packed) => Ok(packed
                    .dequantize(p, ex.param(p).dtype())
                    .map_err(model_err)?
                    .contiguous()?),
                None => Ok(ex.param(p).clone()),
            }
        };
        let mut out = HashMap::new();
        for (t, a) in &self.experts {
            if sign < 0.0 && self.resident.contains_key(&t.shape.module) {
                continue; // restored from its packed weights instead
            }
            let ex = &experts[&t.shape.module];
            let w = dense(ex, t.shape.param)?;
            // expert by expert: the peak extra memory is one expert's ΔW, not the whole [E, in, out] stack
            let mut rows = Vec::with_capacity(a.num_experts());
            for e in 0..a.num_experts() {
                rows.push(a.merged_expert(&w.get(e)?, e, sign)?);
            }
            out.insert(
                (t.shape.module.clone(), t.shape.param.name()),
                Tensor::stack(&rows, 0)?,
            );
        }
        for (module, ex) in &experts {
            if ex.packed().is_none() || !out.keys().any(|(m, _)| m == module) {
                continue;
            }
            for p in [ExpertParam::GateUp, ExpertParam::Down] {
                if let Entry::Vacant(slot) = out.entry((module.clone(), p.name())) {
                    slot.insert(dense(ex, p)?);
                }
            }
        }
        Ok(out)
    }
}

/// [`LoraModel::saved_config`] of `config` resolved to `plan`.
fn saved_config(config: &LoraConfig, plan: &TargetPlan) -> LoraConfig {
    let mut c = config.clone();
    c.inference_mode = true;
    c.peft_version = PEFT_VERSION.to_string();
    if c.target_modules
        .as_ref()
        .is_some_and(TargetModules::is_all_linear)
    {
        c.target_modules = Some(TargetModules::List(plan.resolved_target_modules()));
    }
    if c.task_type.is_none() && c.auto_mapping.is_none() {
        c.auto_mapping = Some(json!({
            "base_model_class": "GptOssForCausalLM",
            "parent_library": "transformers.models.gpt_oss.modeling_gpt_oss",
        }));
    }
    c
}

/// Writes a PEFT adapter directory (as [`LoraModel::save_pretrained`]) for `config` on a base of
/// config `base` without building a model: every factor seeded uniform in `±scale` — B too,
/// unlike PEFT's zero init, so that merging changes every targeted weight. For measuring merge
/// and export on checkpoints too large to load (`make_checkpoint --adapter`). Returns the plan.
///
/// # Errors
/// Target matching ([`resolve_targets`]); I/O naming the file.
pub fn write_random_adapter(
    dir: &Path,
    config: &LoraConfig,
    base: &gptoss_model::Config,
    seed: u64,
    scale: f32,
) -> Result<TargetPlan> {
    use rand::Rng;
    let plan = resolve_targets(config, base)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = Vec::new();
    for (key, shape) in plan.expected_keys() {
        let n = shape.iter().product::<usize>();
        let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..=scale)).collect();
        tensors.push((
            key,
            Tensor::from_vec(vals, shape, &candle_core::Device::Cpu)?,
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| LoraError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_adapter_tensors(&dir.join(ADAPTER_WEIGHTS_NAME), &tensors)?;
    saved_config(config, &plan).save(dir)?;
    Ok(plan)
}

/// The linear and expert adapters of a plan, each with its target.
pub(crate) type Adapters = (
    Vec<(LinearTarget, Arc<LoraLinear>)>,
    Vec<(ExpertTarget, Arc<LoraExperts>)>,
);

/// The adapters of every target of `plan` from its PEFT-keyed `factors` (converted to f32
/// [`Var`]s; every key of the plan must be present); `training` switches the linears' dropout.
pub(crate) fn adapters(
    config: &LoraConfig,
    plan: &TargetPlan,
    mut factors: BTreeMap<String, Tensor>,
    training: &Arc<AtomicBool>,
) -> Result<Adapters> {
    let mut take = |key: String| -> Result<Var> {
        let t = factors
            .remove(&key)
            .ok_or_else(|| LoraError::State(format!("internal: no tensor for {key}")))?;
        Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
    };
    let mut linears = Vec::new();
    for t in &plan.linears {
        let (a, b) = (take(t.key(Factor::A))?, take(t.key(Factor::B))?);
        let ad = LoraLinear::new(
            a,
            b,
            t.scaling,
            config.lora_dropout as f32,
            training.clone(),
        );
        linears.push((t.clone(), Arc::new(ad)));
    }
    let mut experts = Vec::new();
    for t in &plan.experts {
        let (a, b) = (take(t.key(Factor::A))?, take(t.key(Factor::B))?);
        let ad = LoraExperts::new(a, b, t.shape.num_experts, t.r, t.scaling);
        experts.push((t.clone(), Arc::new(ad)));
    }
    Ok((linears, experts))
}

/// Checks that every planned module exists in `model` with the planned shape and carries no adapter yet.
fn check_model(model: &mut GptOssForCausalLM, plan: &TargetPlan) -> Result<()> {
    let linears: HashMap<String, &mut gptoss_model::Linear> =
        model.named_linears_mut().into_iter().collect();
    for t in &plan.linears {
        let lin = linears
            .get(&t.shape.name)
            .ok_or_else(|| LoraError::Model(format!("no linear module {:?}", t.shape.name)))?;
        let want = [t.shape.out_features, t.shape.in_features];
        if lin.weight().dims() != want {
            return Err(LoraError::ShapeMismatch {
                key: format!("{}.weight", t.shape.name),
                expected: want.to_vec(),
                found: lin.weight().dims().to_vec(),
            });
        }
        if lin.adapter().is_some() {
            return Err(LoraError::State(format!(
                "{} already carries an adapter; unload it before applying another",
                t.shape.name
            )));
        }
    }
    drop(linears);
    let experts: HashMap<String, &mut gptoss_model::Experts> =
        model.named_experts_mut().into_iter().collect();
    for t in &plan.experts {
        let ex = experts
            .get(&t.shape.module)
            .ok_or_else(|| LoraError::Model(format!("no experts module {:?}", t.shape.module)))?;
        let want = [
            t.shape.num_experts,
            t.shape.in_features,
            t.shape.out_features,
        ];
        if ex.param(t.shape.param).dims() != want {
            return Err(LoraError::ShapeMismatch {
                key: t.shape.param_name(),
                expected: want.to_vec(),
                found: ex.param(t.shape.param).dims().to_vec(),
            });
        }
    }
    Ok(())
}

/// Saves a (merged) model in the HF layout through the model crate's saver: `config.json` +
/// `model.safetensors`, every float tensor stored as `dtype` (bf16 or f32), experts unquantized.
pub fn save_merged_model(model: &GptOssForCausalLM, dir: &Path, dtype: DType) -> Result<()> {
    let opts = SaveOptions {
        dtype: Some(dtype),
        ..SaveOptions::default()
    };
    gptoss_model::save(model, dir, &opts).map_err(model_err)
}
