//! Data parallelism: one process (or, in tests, one thread) per rank, gradients summed over the
//! ranks once per optimizer step, as HF `Trainer` + accelerate's DDP does: in buckets, started
//! while the step's last backward is still running (DDP's overlap; [`StepReduction`]).
//!
//! The trainer sees only [`GradReducer`]: its rank, the world size and element-wise sums over the
//! ranks. Implementations:
//! - [`Single`]: one rank, every reduction the identity (the default: single-process runs are
//!   unchanged, bit for bit).
//! - [`ThreadGroup`]: ranks as threads of one process sharing a buffer (the CPU test of the
//!   data-parallel path; a rank whose thread ends makes the others fail, naming it).
//! - `Nccl` (feature `nccl`): one process per GPU, NCCL all-reduces (gradient buckets on a second
//!   CUDA stream, ordered by events), the NCCL unique id shared through the TCP [`rendezvous`] on
//!   `MASTER_ADDR:MASTER_PORT`.
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

mod buckets;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
mod thread_group;

pub use buckets::{absorb, layer_of, BucketPlan, StepReduction};
pub use launch::LaunchEnv;
pub use thread_group::ThreadGroup;

use candle_core::Tensor;

use crate::error::{Result, SftError};

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
    /// Starts the sum over the ranks of one bucket (a 1-D f32 tensor, same length and call order
    /// on every rank; the caller hands it over: it may be summed in place, so nothing else may
    /// read its storage) and returns without waiting for it where the backend can (NCCL: on a
    /// second stream, so the backward's next layer computes meanwhile); the sum is
    /// [`PendingSum::wait`]'s. Default: [`Self::all_reduce_buckets`] of the one bucket, at once.
    fn start_bucket(&self, bucket: Tensor) -> Result<PendingSum> {
        let mut sums = self.all_reduce_buckets(vec![bucket])?;
        let sum = sums
            .pop()
            .ok_or_else(|| SftError::Trainer("all-reduce returned no bucket".into()))?;
        Ok(PendingSum::ready(sum))
    }
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

/// A sum over the ranks in flight ([`GradReducer::start_bucket`]).
pub struct PendingSum(Box<dyn FnOnce() -> Result<Tensor>>);

impl PendingSum {
    /// A sum already done.
    pub fn ready(sum: Tensor) -> Self {
        Self(Box::new(move || Ok(sum)))
    }

    /// A sum that `wait` completes (it returns the summed tensor once later work on the
    /// tensor's device is ordered after the reduction).
    pub fn new(wait: impl FnOnce() -> Result<Tensor> + 'static) -> Self {
        Self(Box::new(wait))
    }

    /// The sum: 1-D f32, the bucket's length and device.
    ///
    /// # Errors
    /// The reducer's (a rank that died or diverged).
    pub fn wait(self) -> Result<Tensor> {
        (self.0)()
    }
}

impl std::fmt::Debug for PendingSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingSum")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_leaves_gradients_alone() -> Result<()> {
        let mut v = [1.5, -2.0];
        Single.all_reduce_f64(&mut v)?;
        assert_eq!(v, [1.5, -2.0]);
        assert!(any_rank(&Single, true)? && !any_rank(&Single, false)?);
        Ok(())
    }
}
