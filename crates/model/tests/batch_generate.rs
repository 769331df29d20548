//! Continuous batching (`generate_batch`) against one-request-at-a-time generation on the tiny
//! checkpoint fixture: same tokens per request whatever the batch, streaming order, bad input.

mod common;

use candle_core::{DType, Device};
use common::fixture;
use gptoss_model::{
    generate, generate_batch, load, BatchOptions, FinishReason, GenerationConfig, GenerationEvent,
    GenerationRequest, GptOssForCausalLM,
};

fn model() -> GptOssForCausalLM {
    load(fixture("tiny-gpt-oss"), DType::F32, &Device::Cpu).unwrap()
}

/// Prompts of lengths 1..=19 (past the tiny model's sliding window of 8) with distinct tokens.
fn requests(n: usize, sampled: bool) -> Vec<GenerationRequest> {
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7) % 19;
            let prompt = (0..len)
                .map(|j| ((i * 31 + j * 17) % 500) as u32 + 3)
                .collect();
            let config = GenerationConfig {
                max_new_tokens: 3 + (i * 5) % 14,
                temperature: if sampled { 0.9 } else { 0.0 },
                top_p: if sampled { 0.95 } else { 1.0 },
                top_k: if sampled { 40 } else { 0 },
                seed: 100 + i as u64,
                stop_tokens: vec![],
                pad_token_id: 0,
            };
            GenerationRequest { prompt, config }
        })
        .collect()
}

/// Each request generated alone (batch of one) by the plain generator.
fn alone(model: &GptOssForCausalLM, reqs: &[GenerationRequest]) -> Vec<Vec<u32>> {
    reqs.iter()
        .map(|r| {
            generate(model, std::slice::from_ref(&r.prompt), &r.config)
                .unwrap()
                .remove(0)
        })
        .collect()
}

fn batched(
    model: &GptOssForCausalLM,
    reqs: &[GenerationRequest],
    max_batch: usize,
) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut streamed = vec![Vec::new(); reqs.len()];
    let opts = BatchOptions {
        max_batch,
        pad_token_id: 0,
    };
    let mut ended = Vec::new();
    let out = generate_batch(model, reqs, &opts, &mut |e| match e {
        GenerationEvent::Token { request, token } => {
            assert!(
                !ended.contains(&request),
                "token after the end of {request}"
            );
            streamed[request].push(token)
        }
        GenerationEvent::Finished { request, finish } => {
            assert_eq!(finish, FinishReason::Length);
            ended.push(request)
        }
    })
    .unwrap();
    ended.sort();
    assert_eq!(ended, (0..reqs.len()).collect::<Vec<_>>());
    for (o, r) in out.iter().zip(reqs) {
        assert_eq!(o.finish, FinishReason::Length);
        assert_eq!(o.tokens.len(), r.config.max_new_tokens);
    }
    (out.into_iter().map(|o| o.tokens).collect(), streamed)
}

#[test]
fn continuous_batching_equals_one_request_at_a_time() {
    let model = model();
    for sampled in [false, true] {
        let reqs = requests(9, sampled);
        let reference = alone(&model, &reqs);
        for max_batch in [1, 3, 16] {
            let (got, streamed) = batched(&model, &reqs, max_batch);
            assert_eq!(got, reference, "sampled {sampled}, max_batch {max_batch}");
            assert_eq!(
                streamed, reference,
                "streamed tokens, max_batch {max_batch}"
            );
        }
    }
}

#[test]
fn a_sequence_stops_at_its_own_stop_token() {
    let model = model();
    let mut reqs = requests(5, false);
    let reference = alone(&model, &reqs);
    // request 2 stops at the first occurrence of its third greedy token; the others run on
    let stop = reference[2][2];
    let first = reference[2].iter().position(|&t| t == stop).unwrap();
    reqs[2].config.stop_tokens = vec![stop];
    let out = generate_batch(
        &model,
        &reqs,
        &BatchOptions {
            max_batch: 2,
            pad_token_id: 0,
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(out[2].tokens, reference[2][..=first].to_vec());
    assert_eq!(out[2].finish, FinishReason::Stop(stop));
    for i in [0, 1, 3, 4] {
        assert_eq!(out[i].tokens, reference[i], "request {i}");
    }
}

#[test]
fn bad_requests_fail_before_any_generation() {
    let model = model();
    let ctx = model.config().max_position_embeddings;
    let good = requests(2, false);
    type Edit = Box<dyn Fn(&mut GenerationRequest)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|r| r.prompt.clear()), "no tokens"),
        (Box::new(|r| r.prompt[0] = 512), "outside the vocabulary"),
        (Box::new(|r| r.config.temperature = -0.5), "temperature"),
        (Box::new(|r| r.config.top_p = 0.0), "top_p"),
        (Box::new(|r| r.config.max_new_tokens = 0), "max_new_tokens"),
        (
            Box::new(move |r| r.config.max_new_tokens = ctx),
            "exceeds the model's context",
        ),
    ];
    for (edit, needle) in cases {
        let mut reqs = good.clone();
        edit(&mut reqs[1]);
        let mut calls = 0;
        let err = generate_batch(&model, &reqs, &BatchOptions::default(), &mut |_| calls += 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("request 1"), "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert_eq!(calls, 0, "no token before the check ({needle})");
    }
}
