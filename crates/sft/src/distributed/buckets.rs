//! The gradient all-reduce of one optimizer step, bucketed and (under gradient checkpointing)
//! overlapped with the backward pass, as torch DDP's reducer does.
//!
//! [`BucketPlan`] groups the gradient slots into flat f32 buckets of at most
//! [`super::BUCKET_ELEMS`] elements, in the order the backward completes them: the slots of the
//! last decoder layer first, down to layer 0, then the rest (embeddings, final norm, LM head:
//! complete only at the end). The plan depends only on the parameters' names and shapes, so
//! every rank makes the same buckets in the same order, whatever gradients its data produced.
//!
//! [`StepReduction`] runs the plan for one step: while the last micro-batch's backward walks down
//! the layers, each finished layer's buckets (the earlier micro-batches' sums plus this
//! backward's gradients) are started on the reducer ([`GradReducer::start_bucket`]; NCCL runs
//! them on a second stream while the layer below computes); [`StepReduction::finish`] starts the
//! rest, waits for all and writes the sums back. Each bucket carries one presence flag per
//! slot, so a slot that got no gradient on any rank stays empty (AdamW skips it, as torch skips
//! a `None` `.grad`) and a slot with a gradient on some ranks is summed with zeros elsewhere.

use candle_core::{DType, Tensor, Var};

use super::{GradReducer, PendingSum, BUCKET_ELEMS};
use crate::error::{Result, SftError};
use crate::optim::Gradients;

/// When a slot's gradient is complete in a step's last backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ready {
    /// After decoder layer `i`'s backward (layers finish from the last to the first).
    Layer(usize),
    /// Only once the whole backward is done.
    End,
}

/// The decoder layer a parameter belongs to, from its name: `…layers.{i}.…` (HF and PEFT
/// names, e.g. `base_model.model.model.layers.7.mlp.experts.gate_up_proj.lora_A.weight`).
pub fn layer_of(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next().and_then(|i| i.parse().ok());
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
struct Bucket {
    slots: Vec<usize>,
    ready: Ready,
}

/// The fixed grouping of gradient slots into all-reduce buckets, in completion order.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketPlan {
    buckets: Vec<Bucket>,
    names: Vec<String>,
}

impl BucketPlan {
    /// Buckets of at most `max_elems` gradient elements for the parameters `named` (the trainer's
    /// slot order): slots grouped by the layer whose backward completes them ([`layer_of`];
    /// layers in descending order, unnamed-layer slots last), in slot order within a layer. A
    /// slot larger than `max_elems` is a bucket of its own.
    pub fn new(named: &[(String, Var)], max_elems: usize) -> Self {
        let ready: Vec<Ready> = named
            .iter()
            .map(|(n, _)| layer_of(n).map_or(Ready::End, Ready::Layer))
            .collect();
        let mut order: Vec<usize> = (0..named.len()).collect();
        // stable: slot order within one completion point
        order.sort_by_key(|&i| match ready[i] {
            Ready::Layer(l) => (0, usize::MAX - l),
            Ready::End => (1, 0),
        });
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut size = 0;
        for i in order {
            let n = named[i].1.elem_count();
            match buckets.last_mut() {
                Some(b) if b.ready == ready[i] && size + n <= max_elems => {
                    b.slots.push(i);
                    size += n;
                }
                _ => {
                    buckets.push(Bucket {
                        slots: vec![i],
                        ready: ready[i],
                    });
                    size = n;
                }
            }
        }
        Self {
            buckets,
            names: named.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    /// The plan of the trainer's parameters with the default bucket size [`BUCKET_ELEMS`].
    pub fn of(named: &[(String, Var)]) -> Self {
        Self::new(named, BUCKET_ELEMS)
    }

    /// The slots of each bucket, in launch order.
    pub fn bucket_slots(&self) -> Vec<&[usize]> {
        self.buckets.iter().map(|b| b.slots.as_slice()).collect()
    }
}

/// Adds `new` (a micro-batch's gradients) to `grads` ([`crate::trainer::accumulate`]); with a
/// `reduction` in flight, a slot whose bucket has already started must get no gradient here.
///
/// # Errors
/// [`SftError::Trainer`] naming the parameter whose gradient came after its layer's all-reduce
/// started (it would be left out of the sum).
pub fn absorb(
    reduction: Option<&StepReduction<'_>>,
    grads: &mut Gradients,
    new: Vec<Option<Tensor>>,
) -> Result<()> {
    if let Some(r) = reduction {
        if let Some(i) = (0..new.len()).find(|&i| new[i].is_some() && r.started[i]) {
            return Err(SftError::Trainer(format!(
                "the gradient of `{}` arrived after its layer's all-reduce had started: a \
                 parameter named `layers.{{i}}` must get gradients only from decoder layer i",
                r.plan.names[i]
            )));
        }
    }
    crate::trainer::accumulate(grads, new)
}

/// The all-reduce of one optimizer step's gradients, in flight.
pub struct StepReduction<'a> {
    reducer: &'a dyn GradReducer,
    plan: &'a BucketPlan,
    vars: &'a [Var],
    /// Buckets started so far (a prefix of the plan), with their pending sums.
    pending: Vec<PendingSum>,
    /// Slots whose bucket has started: a later gradient for one of them is an error.
    started: Vec<bool>,
}

impl<'a> StepReduction<'a> {
    /// A reduction of the gradients of `vars` (the slots of `plan`) over `reducer`'s ranks.
    ///
    /// # Errors
    /// [`SftError::Optimizer`] when `plan` was made for another number of parameters.
    pub fn new(
        reducer: &'a dyn GradReducer,
        plan: &'a BucketPlan,
        vars: &'a [Var],
    ) -> Result<Self> {
        if plan.names.len() != vars.len() {
            return Err(SftError::Optimizer(format!(
                "all-reduce: a bucket plan of {} parameters for {} vars",
                plan.names.len(),
                vars.len()
            )));
        }
        Ok(Self {
            reducer,
            plan,
            vars,
            pending: Vec::new(),
            started: vec![false; vars.len()],
        })
    }

    /// Decoder layer `layer`'s backward of the step's last micro-batch is done: starts the sums of
    /// the buckets it completes. Each slot's value is `grads` (the earlier micro-batches) plus
    /// `new` (this backward's gradients, which are taken out of `new`).
    ///
    /// # Errors
    /// The reducer's, or a candle error building a bucket.
    pub fn layer_done(
        &mut self,
        layer: usize,
        grads: &Gradients,
        new: &mut [Option<Tensor>],
    ) -> Result<()> {
        self.start_while(Ready::Layer(layer), grads, new)
    }

    /// Starts every bucket not yet started (from `grads`), waits for all and writes the sums into
    /// `grads` (shape and dtype of each slot's gradient; f32 sums). A slot without a gradient on
    /// every rank stays empty.
    ///
    /// # Errors
    /// The reducer's (a rank that died or diverged), or a candle error.
    pub fn finish(mut self, grads: &mut Gradients) -> Result<()> {
        let mut none: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        self.start_while(Ready::End, grads, &mut none)?;
        let pending = std::mem::take(&mut self.pending);
        let sums = pending
            .into_iter()
            .map(PendingSum::wait)
            .collect::<Result<Vec<_>>>()?;
        // every bucket's presence flags in one copy to the host (one wait, not one per bucket)
        let flag_parts = self
            .plan
            .buckets
            .iter()
            .zip(&sums)
            .map(|(b, flat)| {
                let k = b.slots.len();
                flat.narrow(0, flat.elem_count() - k, k)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        if flag_parts.is_empty() {
            return Ok(());
        }
        let flags = Tensor::cat(&flag_parts, 0)?.to_vec1::<f32>()?;
        let mut flag = flags.iter();
        for (bucket, flat) in self.plan.buckets.iter().zip(&sums) {
            let mut offset = 0;
            for &i in &bucket.slots {
                let v = &self.vars[i];
                let len = v.elem_count();
                if flag.next().is_some_and(|&f| f > 0.0) {
                    let dtype = grads.get(i).map_or(v.dtype(), |g| g.dtype());
                    let g = flat
                        .narrow(0, offset, len)?
                        .reshape(v.shape())?
                        .to_dtype(dtype)?;
                    grads.set(i, g)?;
                }
                offset += len;
            }
        }
        Ok(())
    }

    /// Starts, in plan order, the next buckets that are complete at `upto` or earlier.
    fn start_while(
        &mut self,
        upto: Ready,
        grads: &Gradients,
        new: &mut [Option<Tensor>],
    ) -> Result<()> {
        while let Some(bucket) = self.plan.buckets.get(self.pending.len()) {
            let done = match (bucket.ready, upto) {
                (_, Ready::End) => true,
                (Ready::Layer(b), Ready::Layer(u)) => b >= u,
                (Ready::End, Ready::Layer(_)) => false,
            };
            if !done {
                break;
            }
            let flat = self.flatten(bucket, grads, new)?;
            self.pending.push(self.reducer.start_bucket(flat)?);
        }
        Ok(())
    }

    /// One bucket as a flat f32 tensor: each slot's `grads + new` (zeros when it has neither),
    /// then one presence flag (1.0 / 0.0) per slot.
    fn flatten(
        &mut self,
        bucket: &Bucket,
        grads: &Gradients,
        new: &mut [Option<Tensor>],
    ) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(bucket.slots.len() + 1);
        let mut flags = Vec::with_capacity(bucket.slots.len());
        for &i in &bucket.slots {
            self.started[i] = true;
            let v = &self.vars[i];
            let g = match (grads.get(i), new.get_mut(i).and_then(Option::take)) {
                (Some(a), Some(b)) => Some((a + b)?),
                (Some(a), None) => Some(a.clone()),
                (None, b) => b,
            };
            flags.push(f32::from(u8::from(g.is_some())));
            parts.push(match g {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                None => Tensor::zeros(v.elem_count(), DType::F32, v.device())?,
            });
        }
        let dev = self.vars[bucket.slots[0]].device();
        parts.push(Tensor::from_vec(flags, bucket.slots.len(), dev)?);
        Ok(Tensor::cat(&parts, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn named(spec: &[(&str, usize)]) -> Vec<(String, Var)> {
        spec.iter()
            .map(|&(n, len)| {
                let v = Var::zeros(len, DType::F32, &Device::Cpu).expect("zeros");
                (n.to_string(), v)
            })
            .collect()
    }

    #[test]
    fn layer_of_reads_hf_and_peft_names() {
        assert_eq!(
            layer_of("base_model.model.model.layers.7.mlp.experts.lora_A.weight"),
            Some(7)
        );
        assert_eq!(layer_of("model.layers.23.self_attn.sinks"), Some(23));
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_of("lm_head.weight"), None);
        assert_eq!(layer_of("model.layers.x.q"), None);
    }

    #[test]
    fn buckets_follow_the_backward_order_and_the_size_limit() {
        let p = named(&[
            ("model.embed_tokens.weight", 4),
            ("model.layers.0.a", 3),
            ("model.layers.0.b", 3),
            ("model.layers.1.a", 5),
            ("model.layers.1.b", 2),
            ("model.layers.1.c", 9),
            ("lm_head.weight", 1),
        ]);
        let plan = BucketPlan::new(&p, 8);
        // layer 1 first (5 + 2 ≤ 8, then the oversized 9 alone), layer 0, then the rest
        assert_eq!(
            plan.bucket_slots(),
            vec![&[3, 4][..], &[5], &[1, 2], &[0, 6]]
        );
    }

    /// Two ranks: a slot with a gradient on one rank only gets it on both; a slot with none on
    /// either stays empty; a layer's bucket started by `layer_done` sums the earlier
    /// micro-batches' gradient with the new one.
    #[test]
    fn sums_keep_presence_and_take_the_started_gradients() -> Result<()> {
        use super::super::ThreadGroup;
        let p = named(&[
            ("model.layers.0.a", 2),
            ("model.layers.0.b", 1),
            ("lm_head.weight", 2),
        ]);
        let plan = BucketPlan::new(&p, 8);
        let vars: Vec<Var> = p.iter().map(|(_, v)| v.clone()).collect();
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).expect("tensor");
        let threads: Vec<_> = ThreadGroup::new(2, std::time::Duration::from_secs(30))
            .into_iter()
            .map(|g| {
                let (plan, vars) = (plan.clone(), vars.clone());
                std::thread::spawn(move || -> Result<Vec<Option<Vec<f32>>>> {
                    let rank = g.rank() as f32;
                    let mut grads = Gradients::new(3);
                    grads.set(0, t(&[1.0 + rank, 2.0]))?;
                    if rank == 0.0 {
                        grads.set(2, t(&[5.0, 6.0]))?;
                    }
                    let mut r = StepReduction::new(&g, &plan, &vars)?;
                    let mut new = vec![Some(t(&[10.0, 20.0])), None, None];
                    r.layer_done(0, &grads, &mut new)?;
                    assert!(new[0].is_none(), "the started slot is taken");
                    let late = absorb(Some(&r), &mut grads, vec![Some(t(&[1.0, 1.0])), None, None]);
                    assert!(late.is_err(), "a gradient after its bucket started");
                    r.finish(&mut grads)?;
                    (0..3)
                        .map(|i| grads.get(i).map(|g| g.to_vec1::<f32>()).transpose())
                        .collect::<candle_core::Result<Vec<_>>>()
                        .map_err(Into::into)
                })
            })
            .collect();
        for th in threads {
            let got = th
                .join()
                .map_err(|_| SftError::Trainer("rank panicked".into()))??;
            // slot 0: (1 + 10) + (2 + 10), (2 + 20) · 2
            assert_eq!(got[0], Some(vec![23.0, 44.0]));
            assert_eq!(got[1], None);
            assert_eq!(got[2], Some(vec![5.0, 6.0]));
        }
        Ok(())
    }
}
