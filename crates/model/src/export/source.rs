//! Where the parameters of an export come from, one at a time: a loaded (merged) model
//! ([`ModelParams`]) or a checkpoint directory read tensor by tensor, with an optional
//! [`WeightDelta`] (a LoRA adapter) added as the weights stream by ([`CheckpointParams`]).
//! Expert weights are handed out one expert at a time, so no writer holds a whole
//! `[E, in, out]` stack.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{resident_experts, Checkpoint};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::hooks::ExpertParam;
use crate::model::GptOssForCausalLM;
use crate::packed_experts::PackedExperts;
use crate::spec::{named_parameters, tensor_specs, TensorSpec};

/// A change added to stored weights while they stream from a checkpoint into an export (what
/// merging a LoRA adapter is: `gptoss_lora::AdapterMerge`), so a merged export never loads the
/// model ([`super::export_checkpoint`]).
pub trait WeightDelta {
    /// The HF names of the parameters this changes: linear weights (`…self_attn.q_proj.weight`,
    /// `[out, in]`) and expert weights (`…mlp.experts.gate_up_proj`, `[E, in, out]`).
    fn targets(&self) -> Vec<String>;

    /// The merged value of `name` from its stored value `base` (on the host, in the export's
    /// merge dtype, f32 by default): for a linear weight (`expert` `None`) `base` is
    /// `[out, in]`; for an expert weight `base` is expert `expert`'s `[in, out]` slice. The
    /// result has `base`'s shape, in `base`'s dtype as a merge of a model in that dtype gives.
    ///
    /// # Errors
    /// Whatever computing the delta fails with; a name it does not target.
    fn apply(&self, name: &str, expert: Option<usize>, base: &Tensor) -> Result<Tensor>;
}

/// The parameters an export writes (see the module docs).
pub(crate) trait ParamSource {
    /// The model's config.
    fn config(&self) -> &Config;

    /// Every parameter in HF order (expert weights with their dense `[E, in, out]` shape).
    fn specs(&self) -> Vec<TensorSpec> {
        tensor_specs(self.config())
    }

    /// The whole value of a parameter other than an expert weight, in any float dtype on any
    /// device (`dtype`, the export's float dtype, is a hint: the writer converts).
    fn tensor(&self, spec: &TensorSpec, dtype: DType) -> Result<Tensor>;

    /// Expert `e` of the expert weight `spec` as `[in, out]` (any float dtype and device; MXFP4
    /// decoded to `dtype` unless merged).
    fn expert(&self, spec: &TensorSpec, e: usize, dtype: DType) -> Result<Tensor>;

    /// The stored MXFP4 blocks `[E, out, in/32, 16]` and scales `[E, out, in/32]` (u8) of the
    /// expert weight `spec` when they are exported unchanged; `None` when it is dense or changed.
    fn packed(&self, spec: &TensorSpec) -> Result<Option<(Tensor, Tensor)>>;
}

/// The parameters of a loaded model; MXFP4-resident experts are passed through or decoded one
/// expert at a time.
pub(crate) struct ModelParams<'a> {
    model: &'a GptOssForCausalLM,
    params: HashMap<String, Tensor>,
    resident: HashMap<String, (Arc<PackedExperts>, ExpertParam)>,
}

impl<'a> ModelParams<'a> {
    pub(crate) fn new(model: &'a GptOssForCausalLM) -> Self {
        Self {
            model,
            params: named_parameters(model).into_iter().collect(),
            resident: resident_experts(model),
        }
    }

    fn param(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .ok_or_else(|| ModelError::arg(name, "parameter missing from the model"))
    }
}

impl ParamSource for ModelParams<'_> {
    fn config(&self) -> &Config {
        self.model.config()
    }

    fn tensor(&self, spec: &TensorSpec, _dtype: DType) -> Result<Tensor> {
        Ok(self.param(&spec.name)?.clone())
    }

    fn expert(&self, spec: &TensorSpec, e: usize, dtype: DType) -> Result<Tensor> {
        let Some((p, ep)) = self.resident.get(&spec.name) else {
            return Ok(self.param(&spec.name)?.get(e)?);
        };
        let (b, s) = p.blocks_and_scales(*ep);
        let one = |t: &Tensor| t.narrow(0, e, 1).and_then(|t| t.contiguous());
        let bname = format!("{}_blocks", spec.name);
        let t = gptoss_mxfp4::dequantize_named(
            &one(b)?,
            &one(s)?,
            dtype,
            gptoss_mxfp4::Layout::Transposed,
            Some(&bname),
        )
        .map_err(|err| ModelError::mxfp4(&spec.name, err))?;
        Ok(t.squeeze(0)?)
    }

    fn packed(&self, spec: &TensorSpec) -> Result<Option<(Tensor, Tensor)>> {
        Ok(self.resident.get(&spec.name).map(|(p, ep)| {
            let (b, s) = p.blocks_and_scales(*ep);
            (b.clone(), s.clone())
        }))
    }
}

/// The parameters of a checkpoint directory, read one tensor (or expert) at a time from the
/// memory-mapped files, `delta` added to the ones it targets (read in `merge_dtype`).
pub(crate) struct CheckpointParams<'a> {
    ckpt: &'a Checkpoint,
    delta: Option<&'a dyn WeightDelta>,
    targets: HashSet<String>,
    merge_dtype: DType,
}

impl<'a> CheckpointParams<'a> {
    /// Checks that every parameter is stored (shapes, dtypes), that nothing else is, and that
    /// `delta` targets only parameters of the checkpoint, before anything is written.
    ///
    /// # Errors
    /// The errors of [`Checkpoint::find`] and [`Checkpoint::check_no_extra`];
    /// [`ModelError::InvalidArgument`] naming a target the checkpoint does not store (e.g.
    /// `lm_head.weight` of a model with tied embeddings).
    pub(crate) fn new(
        ckpt: &'a Checkpoint,
        delta: Option<&'a dyn WeightDelta>,
        merge_dtype: DType,
    ) -> Result<Self> {
        let specs = tensor_specs(ckpt.config());
        for s in &specs {
            ckpt.find(s)?;
        }
        ckpt.check_no_extra(&specs)?;
        let targets: HashSet<String> = delta
            .map(|d| d.targets())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let names: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let mut missing: Vec<&String> = targets
            .iter()
            .filter(|t| !names.contains(t.as_str()))
            .collect();
        missing.sort();
        if let Some(t) = missing.first() {
            return Err(ModelError::arg(
                "adapter",
                format!(
                    "it changes `{t}`, which {} does not store",
                    ckpt.dir().display()
                ),
            ));
        }
        Ok(Self {
            ckpt,
            delta,
            targets,
            merge_dtype,
        })
    }

    fn delta(&self, name: &str) -> Option<&dyn WeightDelta> {
        self.delta.filter(|_| self.targets.contains(name))
    }
}

impl ParamSource for CheckpointParams<'_> {
    fn config(&self) -> &Config {
        self.ckpt.config()
    }

    fn tensor(&self, spec: &TensorSpec, dtype: DType) -> Result<Tensor> {
        let stored = self.ckpt.find(spec)?;
        match self.delta(&spec.name) {
            Some(d) => d.apply(
                &spec.name,
                None,
                &stored.dense(spec, self.merge_dtype, &Device::Cpu)?,
            ),
            None => stored.dense(spec, dtype, &Device::Cpu),
        }
    }

    fn expert(&self, spec: &TensorSpec, e: usize, dtype: DType) -> Result<Tensor> {
        let stored = self.ckpt.find(spec)?;
        match self.delta(&spec.name) {
            Some(d) => d.apply(
                &spec.name,
                Some(e),
                &stored.expert(spec, e, self.merge_dtype)?,
            ),
            None => stored.expert(spec, e, dtype),
        }
    }

    fn packed(&self, spec: &TensorSpec) -> Result<Option<(Tensor, Tensor)>> {
        if self.delta(&spec.name).is_some() {
            return Ok(None);
        }
        self.ckpt.find(spec)?.packed(&Device::Cpu)
    }
}
