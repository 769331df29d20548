//! The floating-point-operation count HF's `Trainer` logs as `total_flos` (and saves in
//! `trainer_state.json`).
//!
//! transformers 5.24 (`Trainer.floating_point_ops`): per micro-batch,
//! `6 × input_ids.numel() × model.num_parameters(exclude_embeddings=True)`, where `input_ids` is the
//! padded `[B, T]` batch (padding counts) and the parameter count is every parameter of the
//! (PEFT-wrapped) model except the `nn.Embedding` weights: the frozen base model, its LM head and
//! the LoRA factors. The per-micro-batch values are summed into `current_flos` and added to
//! `state.total_flos` (`store_flos`) at every log, every checkpoint and at the end of training.

/// HF's `total_flos` counter ([`FlosCounter::add_batch`] per micro-batch, [`FlosCounter::store`]
/// where HF calls `store_flos`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlosCounter {
    params: u64,
    current: f64,
    total: f64,
}

impl FlosCounter {
    /// A counter for a model of `params` non-embedding parameters (trainable and frozen),
    /// starting from `total` (a resumed run's `trainer_state.json` value, else 0).
    pub fn new(params: u64, total: f64) -> Self {
        Self {
            params,
            current: 0.0,
            total,
        }
    }

    /// The non-embedding parameter count the counter multiplies by.
    pub fn params(&self) -> u64 {
        self.params
    }

    /// Counts one micro-batch of `input_ids` elements (`B × T`, padding included).
    pub fn add_batch(&mut self, input_ids_numel: u64) {
        self.current += floating_point_ops(input_ids_numel, self.params);
    }

    /// Moves the micro-batches counted since the last call into the total (HF's `store_flos`);
    /// returns the new total.
    pub fn store(&mut self) -> f64 {
        self.total += self.current;
        self.current = 0.0;
        self.total
    }

    /// The stored total (micro-batches since the last [`Self::store`] not included).
    pub fn total(&self) -> f64 {
        self.total
    }
}

/// `6 × tokens × params`, computed exactly and rounded once to `f64` (Python's
/// `float(6 * numel * num_parameters)`).
pub fn floating_point_ops(tokens: u64, params: u64) -> f64 {
    (6u128 * tokens as u128 * params as u128) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_six_flops_per_token_and_parameter() {
        assert_eq!(floating_point_ops(48, 162_000), 46_656_000.0);
        let mut c = FlosCounter::new(10, 5.0);
        c.add_batch(2);
        c.add_batch(3);
        assert_eq!(c.total(), 5.0);
        assert_eq!(c.store(), 5.0 + 300.0);
        assert_eq!(c.store(), 305.0);
    }
}
