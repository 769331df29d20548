//! Routing plans recorded by the first forward pass of gradient checkpointing and replayed by the
//! recompute.
//!
//! With gradient checkpointing every decoder layer runs twice: once without autograd, and again from
//! its saved input just before its backward. The MoE's routing plan (which rows go to which expert)
//! is built on the host from the top-k indices: a device→host copy that waits for the device, once
//! per call. The recompute sees the same input and runs the same deterministic kernels, so it routes
//! identically; under [`RouteReplay::replaying`] it reuses the plan (and its device index maps) the
//! forward pass recorded instead of waiting, so the host can enqueue the whole backward ahead of the
//! device. The recompute's indices are still computed on the device, and [`RouteReplay::verify`]
//! compares all of them with the recorded ones in one copy at the end: a difference is an error
//! (the step's gradients would not be those of the routing the forward pass used).
//!
//! The state is per thread (the trainer drives one model from one thread) and keyed by the
//! [`crate::Experts`] a plan belongs to. Outside a [`RouteReplay`] nothing is recorded.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::{DType, Tensor};

#[derive(Default)]
enum Mode {
    #[default]
    Off,
    /// `detached`: see [`RouteReplay::record_detached`].
    Record { detached: bool },
    /// `gradients_only`: see [`RouteReplay::replaying_for_gradients`].
    Replay { gradients_only: bool },
}

/// What one MoE call recorded: its plan (opaque here) and its top-k indices `[N, k]` u32.
struct Recorded {
    plan: Rc<dyn Any>,
    indices: Tensor,
}

#[derive(Default)]
struct State {
    mode: Mode,
    plans: HashMap<usize, Recorded>,
    /// (recorded, recomputed) indices of every replayed call.
    replayed: Vec<(Tensor, Tensor)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Records the routing plans of the MoE calls of this thread until [`RouteReplay::replaying`],
/// then replays them; dropping it (or [`RouteReplay::verify`]) ends both.
#[derive(Debug)]
pub struct RouteReplay {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl RouteReplay {
    /// Starts recording (any earlier state of this thread is dropped).
    pub fn record() -> Self {
        Self::start(false)
    }

    /// As [`Self::record`], for a forward pass that is not differentiated (the first pass of
    /// gradient checkpointing, whose layer outputs are detached): the MoE then runs without
    /// autograd, and with MXFP4-resident experts on the per-expert path it decodes all of a
    /// layer's experts in one launch per projection instead of one per expert (the bf16 copy is
    /// freed right after its matmul, as nothing keeps it for a backward).
    pub fn record_detached() -> Self {
        Self::start(true)
    }

    fn start(detached: bool) -> Self {
        STATE.with(|s| {
            *s.borrow_mut() = State {
                mode: Mode::Record { detached },
                ..State::default()
            }
        });
        Self {
            _not_send: std::marker::PhantomData,
        }
    }

    /// From now on MoE calls reuse the recorded plans (calls without one build their own).
    pub fn replaying(&self) {
        STATE.with(|s| {
            s.borrow_mut().mode = Mode::Replay {
                gradients_only: false,
            }
        });
    }

    /// As [`Self::replaying`], for a recompute whose outputs are only differentiated, never read
    /// (the trainer's: each layer's output is the root of its backward through
    /// [`gptoss_kernels::seed_gradient`]). A replayed MoE call with frozen experts and no expert adapters
    /// then returns zeros of its output's shape and computes nothing; its backward recomputes the
    /// experts from its input a few experts at a time, each expert decoded once for both its
    /// forward and its backward products (see [`crate::Experts::set_backward_chunk`]). Values
    /// computed downstream of such a call are therefore not the model's.
    pub fn replaying_for_gradients(&self) {
        STATE.with(|s| {
            s.borrow_mut().mode = Mode::Replay {
                gradients_only: true,
            }
        });
    }

    /// Checks that every replayed call's indices equal the recorded ones (one device→host copy),
    /// and ends recording and replay.
    ///
    /// # Errors
    /// How many routing choices differed, or a device error.
    pub fn verify(self) -> candle_core::Result<()> {
        let replayed = STATE.with(|s| std::mem::take(&mut s.borrow_mut().replayed));
        drop(self);
        if replayed.is_empty() {
            return Ok(());
        }
        let flat = |f: fn(&(Tensor, Tensor)) -> &Tensor| -> candle_core::Result<Tensor> {
            let parts = replayed
                .iter()
                .map(|p| f(p).flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };
        let (a, b) = (flat(|p| &p.0)?, flat(|p| &p.1)?);
        let differ = a
            .ne(&b)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        if differ != 0.0 {
            candle_core::bail!(
                "route replay: the recompute routed {differ} of {} (token, slot) pairs differently \
                 from the forward pass, so this step's gradients do not match its routing \
                 (non-deterministic kernels on this device?)",
                a.elem_count()
            );
        }
        Ok(())
    }
}

impl Drop for RouteReplay {
    fn drop(&mut self) {
        STATE.with(|s| *s.borrow_mut() = State::default());
    }
}

/// The plan recorded for `key` when replaying (the call's `indices` are kept for
/// [`RouteReplay::verify`]); `None` otherwise, or when the recorded plan is not a `T` for indices
/// of the same shape.
pub(crate) fn replayed<T: Any>(key: usize, indices: &Tensor) -> Option<Rc<T>> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if !matches!(s.mode, Mode::Replay { .. }) {
            return None;
        }
        let rec = s.plans.get(&key)?;
        if rec.indices.dims() != indices.dims() {
            return None;
        }
        let plan = rec.plan.clone().downcast::<T>().ok()?;
        let recorded = rec.indices.clone();
        s.replayed.push((recorded, indices.clone()));
        Some(plan)
    })
}

/// Whether replayed MoE calls may defer their experts to the backward
/// ([`RouteReplay::replaying_for_gradients`]).
pub(crate) fn gradients_only() -> bool {
    STATE.with(|s| {
        matches!(
            s.borrow().mode,
            Mode::Replay {
                gradients_only: true
            }
        )
    })
}

/// Whether MoE calls run in a pass that is not differentiated ([`RouteReplay::record_detached`]).
pub(crate) fn detached_pass() -> bool {
    STATE.with(|s| matches!(s.borrow().mode, Mode::Record { detached: true }))
}

/// Keeps `plan` for `key` when recording.
pub(crate) fn record<T: Any>(key: usize, indices: &Tensor, plan: Rc<T>) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if matches!(s.mode, Mode::Record { .. }) {
            s.plans.insert(
                key,
                Recorded {
                    plan,
                    indices: indices.clone(),
                },
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::RouteReplay;
    use crate::{init_random_packed, Config};

    /// `[N, H]` rows with a fixed pattern (`shift` changes every value).
    fn rows(n: usize, h: usize, shift: f32) -> candle_core::Result<Tensor> {
        let v: Vec<f32> = (0..n * h)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * (1.0 + shift) + shift)
            .collect();
        Tensor::from_vec(v, (n, h), &Device::Cpu)
    }

    #[test]
    fn replayed_recompute_equals_fresh_and_mismatch_is_reported() -> crate::Result<()> {
        let cfg = Config::tiny();
        let model = init_random_packed(&cfg, DType::F32, &Device::Cpu, Some(3))?;
        let mlp = &model.model.layers[0].mlp;
        let x = rows(9, cfg.hidden_size, 0.0)?;
        let fresh = mlp.forward(&x.reshape((1, 9, cfg.hidden_size))?)?.0;

        // record, then replay on the same input: the same output, and verify passes
        let replay = RouteReplay::record();
        mlp.forward(&x.reshape((1, 9, cfg.hidden_size))?)?;
        replay.replaying();
        let again = mlp.forward(&x.reshape((1, 9, cfg.hidden_size))?)?.0;
        replay.verify()?;
        let d = (fresh - &again)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "replayed plan changed the output by {d}");

        // record on one input, replay on another that routes differently: verify fails
        let other = rows(9, cfg.hidden_size, 0.75)?.neg()?;
        let replay = RouteReplay::record();
        mlp.forward(&x.reshape((1, 9, cfg.hidden_size))?)?;
        replay.replaying();
        mlp.forward(&other.reshape((1, 9, cfg.hidden_size))?)?;
        let err = replay
            .verify()
            .expect_err("a different routing must be reported");
        assert!(err.to_string().contains("routed"), "{err}");

        // outside a RouteReplay nothing is recorded or replayed
        assert!(super::replayed::<()>(0, &x).is_none());
        Ok(())
    }

    #[test]
    fn detached_recording_gives_the_same_output_without_autograd() -> crate::Result<()> {
        let cfg = Config::tiny();
        let model = init_random_packed(&cfg, DType::F32, &Device::Cpu, Some(4))?;
        let mlp = &model.model.layers[1].mlp;
        let x = candle_core::Var::from_tensor(&rows(11, cfg.hidden_size, 0.3)?)?;
        let x3 = x.as_tensor().reshape((1, 11, cfg.hidden_size))?;
        let fresh = mlp.forward(&x3)?.0;
        assert!(fresh.track_op(), "the plain forward is differentiable");
        let replay = RouteReplay::record_detached();
        let detached = mlp.forward(&x3)?.0;
        drop(replay);
        assert!(!detached.track_op(), "a detached pass builds no graph");
        let d = (fresh - detached)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "the detached pass changed the output by {d}");
        Ok(())
    }
}
