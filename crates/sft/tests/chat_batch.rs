//! Batched chat generation (`chat_generate_batch`): every request's tokens and streamed channel
//! deltas equal its own `chat_generate`, with a LoRA adapter unmerged, and the merged adapter
//! generates the same greedy tokens.

mod trainer_support;

use candle_core::{DType, Device};
use gptoss_harmony::HarmonyTokenizer;
use gptoss_lora::{InitLoraWeights, LoraModel};
use gptoss_model::{GenerationConfig, GenerationRequest, GptOssForCausalLM};
use gptoss_sft::config::TrainingConfig;
use gptoss_sft::trainer::pipeline::lora_config;
use gptoss_sft::trainer::{chat_generate, chat_generate_batch, chat_prompt, ChatReply};

fn requests(tok: &HarmonyTokenizer) -> Vec<GenerationRequest> {
    let chats = [
        ("German", "¿Cuál es el capital de Australia?"),
        ("French", "What is 12 times 7?"),
        ("Spanish", "Name a prime number."),
        ("Italian", "Wie spät ist es?"),
        ("English", "Tell me a joke about compilers, please."),
    ];
    chats
        .iter()
        .enumerate()
        .map(|(i, (lang, q))| GenerationRequest {
            prompt: chat_prompt(tok, lang, q, None).unwrap(),
            config: GenerationConfig {
                max_new_tokens: 4 + i,
                temperature: if i == 4 { 0.8 } else { 0.0 },
                seed: i as u64,
                ..GenerationConfig::default()
            },
        })
        .collect()
}

type Deltas = Vec<(String, String)>;

fn one_by_one(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    reqs: &[GenerationRequest],
) -> Vec<(ChatReply, Deltas)> {
    reqs.iter()
        .map(|r| {
            let mut deltas = Vec::new();
            let reply = chat_generate(model, tok, &r.prompt, r.config.clone(), &mut |c, d| {
                deltas.push((c.to_string(), d.to_string()))
            })
            .unwrap();
            (reply, deltas)
        })
        .collect()
}

fn batched(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    reqs: &[GenerationRequest],
) -> Vec<(ChatReply, Deltas)> {
    let mut deltas = vec![Vec::new(); reqs.len()];
    let replies = chat_generate_batch(model, tok, reqs, 2, &mut |r, c, d| {
        deltas[r].push((c.to_string(), d.to_string()))
    })
    .unwrap();
    replies.into_iter().zip(deltas).collect()
}

#[test]
fn batched_chat_equals_single_chats_with_unmerged_and_merged_lora() {
    let tok = HarmonyTokenizer::o200k_harmony().unwrap();
    let mcfg = trainer_support::tiny_real_vocab_config();
    let mut model = gptoss_model::init_random(&mcfg, DType::F32, &Device::Cpu, Some(11)).unwrap();
    let cfg = TrainingConfig {
        lora_r: 4,
        lora_alpha: 8.0,
        lora_target_parameters: vec!["1.mlp.experts.gate_up_proj".into()],
        ..TrainingConfig::default()
    };
    let mut lcfg = lora_config(&cfg);
    lcfg.init_lora_weights = InitLoraWeights::Bool(false); // B ≠ 0: the adapter changes the output
    let lora = LoraModel::new(&mut model, lcfg, 5).unwrap();
    let reqs = requests(&tok);
    let single = one_by_one(&model, &tok, &reqs);
    let batch = batched(&model, &tok, &reqs);
    for (i, ((a, da), (b, db))) in single.iter().zip(&batch).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}: tokens");
        assert_eq!(a.tokens.len(), reqs[i].config.max_new_tokens, "request {i}");
        assert_eq!(
            (&a.analysis, &a.final_text, &a.other),
            (&b.analysis, &b.final_text, &b.other),
            "request {i}: reply text"
        );
        assert_eq!(da, db, "request {i}: streamed deltas");
    }
    // the adapter matters: the bare base model says something else for some request
    let base = gptoss_model::init_random(&mcfg, DType::F32, &Device::Cpu, Some(11)).unwrap();
    let plain = batched(&base, &tok, &reqs);
    assert!(
        (0..4).any(|i| plain[i].0.tokens != batch[i].0.tokens),
        "the random adapter changed no greedy output"
    );
    lora.merge_and_unload(&mut model).unwrap();
    let merged = batched(&model, &tok, &reqs);
    for i in 0..4 {
        assert_eq!(
            merged[i].0.tokens, batch[i].0.tokens,
            "greedy request {i} after merge"
        );
    }
}
