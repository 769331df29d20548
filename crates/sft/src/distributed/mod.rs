//! Data parallelism: one process (or, in tests, one thread) per rank, gradients summed over the
//! ranks after every optimizer step's micro-batches, as HF `Trainer` + accelerate's DDP does.
//!
//! The trainer sees only [`GradReducer`]: its rank, the world size and element-wise sums over the
//! ranks. Implementations:
//! - [`Single`]: one rank, every reduction the identity (the default: single-process runs are
//!   unchanged, bit for bit).
//! - [`ThreadGroup`]: ranks as threads of one process sharing a buffer (the CPU test of the
//!   data-parallel path; a rank whose thread ends makes the others fail, naming it).
//! - `Nccl` (feature `nccl`): one process per GPU, NCCL all-reduces on the device's stream, the
//!   NCCL unique id shared through the TCP [`rendezvous`] on `MASTER_ADDR:MASTER_PORT`.
//!
//! What the ranks compute together ([`crate::trainer::Trainer`]): each rank reads a disjoint,
//! deterministic shard of every global batch (global batch = per-device batch × grad-accum ×
//! world size; rank `r` takes micro-batch `r, r + N, r + 2N, …` of the step, accelerate's
//! `BatchSamplerShard` order); the loss is normalised by the global number of loss tokens (TRL's
//! `average_tokens_across_devices`), so `N` ranks × micro-batch `b` × accumulation `GA` train
//! the same model as one rank with micro-batch `b` and accumulation `GA · N`. Rank 0 writes
//! checkpoints, the adapter, logs and MLflow; every rank resumes from the same checkpoint.
//!
//! Launch: [`launch::LaunchEnv`] reads torchrun's or Slurm's environment.

pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
mod thread_group;

pub use launch::LaunchEnv;
pub use thread_group::ThreadGroup;

use candle_core::{DType, Tensor, Var};

use crate::error::{Result, SftError};
use crate::optim::Gradients;

/// Gradient elements per all-reduce call (f32: 16 MiB), like DDP's 25 MB buckets: few calls,
/// none so large that it cannot start before the whole gradient is flattened.
pub const BUCKET_ELEMS: usize = 4 << 20;

/// Sums over the ranks of a data-parallel job. Every rank calls the same reductions in the same
/// order with buffers of the same lengths; a rank that does not (it died, or took another path)
/// makes the others fail with [`SftError::Distributed`] naming it, within the reducer's timeout.
pub trait GradReducer: Send + Sync {
    /// This process's (or thread's) rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Ranks of the job.
    fn world_size(&self) -> usize;
    /// Element-wise sum over the ranks of `values` (same length on every rank), in place.
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Element-wise sums over the ranks of `buckets`: 1-D f32 tensors of the same lengths, in the
    /// same order on every rank. Returns the sums (same lengths and device).
    fn all_reduce_buckets(&self, buckets: Vec<Tensor>) -> Result<Vec<Tensor>>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_f64(&mut [0.0])
    }
    /// Whether every reduction is the identity (one rank, nothing to exchange): the trainer
    /// then skips the gradient reduction altogether.
    fn is_identity(&self) -> bool {
        false
    }
    /// Whether this rank writes files (checkpoints, adapter, logs, MLflow): rank 0.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
    /// The normal end of this rank's run (NCCL: tells the others goodbye, so that its exit is
    /// not reported as a failure). Default: nothing.
    fn finish(&self) {}
}

/// Which reducer [`join`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// NCCL when the launcher's world size is above 1, else [`Single`].
    #[default]
    Auto,
    /// [`Single`], whatever the launcher variables say.
    Off,
    /// NCCL, also at world size 1 (to check the NCCL path on one GPU).
    Nccl,
}

/// How long ranks wait for each other at the rendezvous (`GPTOSS_RENDEZVOUS_TIMEOUT_S`,
/// default 300 s: loading a 120b checkpoint on a busy node takes minutes).
pub fn rendezvous_timeout() -> std::time::Duration {
    let secs = std::env::var("GPTOSS_RENDEZVOUS_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(300.0);
    std::time::Duration::from_secs_f64(secs)
}

/// This process's reducer per `backend` and the launch environment `env`, on `device`: a
/// [`Single`], or (feature `nccl`) an NCCL rank that met the others (a dead rank then exits
/// this process with an error naming it).
///
/// # Errors
/// [`SftError::Config`] when NCCL is asked for (or the launcher's world size is above 1) in a
/// build without the `nccl` feature; [`SftError::Distributed`] when the rendezvous or NCCL fails.
pub fn join(
    backend: Backend,
    env: &LaunchEnv,
    device: &candle_core::Device,
) -> Result<Box<dyn GradReducer>> {
    let nccl = match backend {
        Backend::Off => false,
        Backend::Auto => env.is_distributed(),
        Backend::Nccl => true,
    };
    if !nccl {
        return Ok(Box::new(Single));
    }
    #[cfg(feature = "nccl")]
    {
        let r = nccl::Nccl::init(
            env,
            device,
            rendezvous_timeout(),
            rendezvous::exit_on_failure(),
        )?;
        Ok(Box::new(r))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = device;
        Err(SftError::config(
            "distributed",
            format!(
                "rank {} of {}: data parallel needs NCCL; build with `--features nccl` (or pass \
                 --distributed off to ignore the launcher's variables)",
                env.rank, env.world_size
            ),
        ))
    }
}

/// One rank: every reduction is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl GradReducer for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_buckets(&self, buckets: Vec<Tensor>) -> Result<Vec<Tensor>> {
        Ok(buckets)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn is_identity(&self) -> bool {
        true
    }
}

/// Whether `flag` is set on any rank.
pub fn any_rank(reducer: &dyn GradReducer, flag: bool) -> Result<bool> {
    let mut v = [f64::from(u8::from(flag))];
    reducer.all_reduce_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

/// Sums every gradient slot of `grads` (slots as `vars`) over the ranks, in place, through
/// flat f32 buckets of at most [`BUCKET_ELEMS`] elements (one all-reduce per bucket, in slot
/// order). A slot without a gradient on this rank contributes zeros; a slot without a gradient
/// on every rank stays empty (AdamW skips it, as torch skips a `None` `.grad`). Gradients keep
/// their shape and dtype (others than f32 are summed in f32).
pub fn all_reduce_gradients(
    reducer: &dyn GradReducer,
    vars: &[Var],
    grads: &mut Gradients,
) -> Result<()> {
    if vars.len() != grads.len() {
        return Err(SftError::Optimizer(format!(
            "all-reduce: {} vars for {} gradient slots",
            vars.len(),
            grads.len()
        )));
    }
    let mut present: Vec<f64> = (0..grads.len())
        .map(|i| f64::from(u8::from(grads.get(i).is_some())))
        .collect();
    reducer.all_reduce_f64(&mut present)?;
    let slots: Vec<usize> = (0..grads.len()).filter(|&i| present[i] > 0.0).collect();
    let buckets = buckets_of(vars, &slots, BUCKET_ELEMS);
    let mut flats = Vec::with_capacity(buckets.len());
    for bucket in &buckets {
        let parts = bucket
            .iter()
            .map(|&i| match grads.get(i) {
                Some(g) => Ok(g.to_dtype(DType::F32)?.flatten_all()?),
                None => Ok(Tensor::zeros(
                    vars[i].elem_count(),
                    DType::F32,
                    vars[i].device(),
                )?),
            })
            .collect::<Result<Vec<_>>>()?;
        flats.push(Tensor::cat(&parts, 0)?);
    }
    let summed = reducer.all_reduce_buckets(flats)?;
    if summed.len() != buckets.len() {
        return Err(SftError::Trainer(format!(
            "all-reduce returned {} buckets for {}",
            summed.len(),
            buckets.len()
        )));
    }
    for (bucket, flat) in buckets.iter().zip(&summed) {
        let mut offset = 0;
        for &i in bucket {
            let v = &vars[i];
            let n = v.elem_count();
            let dtype = grads.get(i).map_or(v.dtype(), |g| g.dtype());
            let g = flat
                .narrow(0, offset, n)?
                .reshape(v.shape())?
                .to_dtype(dtype)?;
            grads.set(i, g)?;
            offset += n;
        }
    }
    Ok(())
}

/// `slots` in order, grouped into runs of at most `max_elems` elements (a slot larger than that
/// is a bucket of its own).
fn buckets_of(vars: &[Var], slots: &[usize], max_elems: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut size = 0;
    for &i in slots {
        let n = vars[i].elem_count();
        match out.last_mut() {
            Some(b) if size + n <= max_elems => {
                b.push(i);
                size += n;
            }
            _ => {
                out.push(vec![i]);
                size = n;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(n: usize) -> Var {
        Var::zeros(n, DType::F32, &Device::Cpu).expect("zeros")
    }

    #[test]
    fn buckets_group_slots_up_to_the_limit() {
        let vars: Vec<Var> = [3, 4, 2, 9, 1].iter().map(|&n| var(n)).collect();
        let b = buckets_of(&vars, &[0, 1, 2, 3, 4], 8);
        assert_eq!(b, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
        let b = buckets_of(&vars, &[0, 2, 4], 8);
        assert_eq!(b, vec![vec![0, 2, 4]]);
    }

    #[test]
    fn single_leaves_gradients_alone() -> Result<()> {
        let mut v = [1.5, -2.0];
        Single.all_reduce_f64(&mut v)?;
        assert_eq!(v, [1.5, -2.0]);
        assert!(any_rank(&Single, true)? && !any_rank(&Single, false)?);
        Ok(())
    }
}
