//! [`LayeredCausalLm`] for [`GptOssForCausalLM`]: the per-layer forward pieces of the model crate.

use super::backward::{LayeredCausalLm, MicroBatch};
use candle_core::{Result, Tensor};
use gptoss_model::{AttnContext, GptOssForCausalLM};

fn wrap(e: gptoss_model::ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl LayeredCausalLm for GptOssForCausalLM {
    type Context = AttnContext;

    fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    fn experts_per_token(&self) -> usize {
        self.config().num_experts_per_tok
    }

    fn num_parameters_excluding_embeddings(&self) -> u64 {
        let c = self.config();
        gptoss_model::num_parameters(c) - (c.vocab_size * c.hidden_size) as u64
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config().max_position_embeddings)
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        GptOssForCausalLM::embed(self, input_ids).map_err(wrap)
    }

    fn context(&self, batch: &MicroBatch) -> Result<AttnContext> {
        match &batch.packed_seq_lens {
            Some(lens) => self.packed_attention_context(lens),
            None => {
                let (b, t) = batch.input_ids.dims2()?;
                self.attention_context(b, t, 0, batch.attention_mask.as_ref())
            }
        }
        .map_err(wrap)
    }

    fn layer(&self, i: usize, h: &Tensor, ctx: &AttnContext) -> Result<(Tensor, Tensor)> {
        let out = self.layer_forward(i, h, ctx).map_err(wrap)?;
        Ok((out.hidden, out.router_logits))
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        self.final_hidden(h).map_err(wrap)
    }

    fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.weight()
    }

    fn embeddings_trainable(&self) -> bool {
        self.model.embed_tokens.track_op()
    }
}
