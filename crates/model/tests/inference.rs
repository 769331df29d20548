//! Padding, KV-cache decoding and generation against the transformers reference logits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs, reference};
use gptoss_model::{generate, load, GenerationConfig, Generator};

#[test]
fn padded_rows_equal_unpadded_rows() {
    let name = "tiny-gpt-oss";
    let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let r = reference(name);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let (len, total) = (25usize, 40usize);
    let row: Vec<u32> = ids
        .get(0)
        .unwrap()
        .narrow(0, 0, len)
        .unwrap()
        .to_vec1()
        .unwrap();
    let pad = total - len;
    let left: Vec<u32> = std::iter::repeat_n(0, pad)
        .chain(row.iter().copied())
        .collect();
    let right: Vec<u32> = row
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0, pad))
        .collect();
    let lmask: Vec<u32> = std::iter::repeat_n(0, pad)
        .chain(std::iter::repeat_n(1, len))
        .collect();
    let rmask: Vec<u32> = std::iter::repeat_n(1, len)
        .chain(std::iter::repeat_n(0, pad))
        .collect();
    let batch = Tensor::new(vec![left, right], &Device::Cpu).unwrap();
    let mask = Tensor::new(vec![lmask, rmask], &Device::Cpu).unwrap();
    let logits = model.forward(&batch, Some(&mask)).unwrap();
    let want = r["logits"].get(0).unwrap().narrow(0, 0, len).unwrap();
    let got_left = logits.get(0).unwrap().narrow(0, pad, len).unwrap();
    let got_right = logits.get(1).unwrap().narrow(0, 0, len).unwrap();
    assert!(
        max_abs(&got_left, &want) <= 1e-4,
        "left padding: {}",
        max_abs(&got_left, &want)
    );
    assert!(
        max_abs(&got_right, &want) <= 1e-4,
        "right padding: {}",
        max_abs(&got_right, &want)
    );
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    for (name, chunks) in [
        ("tiny-gpt-oss", vec![13usize, 1, 1, 5, 1, 19]),
        ("tiny-gpt-oss-w128", vec![100, 1, 30, 1, 1, 27]),
    ] {
        let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
        let r = reference(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let mut cache = model.new_cache();
        let mut start = 0;
        let mut parts = Vec::new();
        for c in chunks {
            let chunk = ids.narrow(1, start, c).unwrap();
            parts.push(model.forward_with_cache(&chunk, None, &mut cache).unwrap());
            start += c;
        }
        assert_eq!(start, ids.dim(1).unwrap());
        let logits = Tensor::cat(&parts, 1).unwrap();
        let d = max_abs(&logits, &r["logits"]);
        assert!(d <= 1e-4, "{name}: cached decoding differs by {d}");
        // sliding layers keep at most window - 1 positions
        let w = model.config().sliding_window.unwrap();
        assert!(
            cache.layers[0].len() < w,
            "{name}: sliding cache holds {}",
            cache.layers[0].len()
        );
        assert_eq!(cache.layers[1].len(), start);
    }
}

#[test]
fn batched_left_padded_generation_equals_single_rows() {
    let name = "tiny-gpt-oss";
    let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let r = reference(name);
    let ids: Vec<Vec<u32>> = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let prompts = vec![ids[0][..7].to_vec(), ids[1][..12].to_vec()];
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        temperature: 0.0,
        stop_tokens: vec![],
        pad_token_id: 0,
        ..Default::default()
    };
    let batched = generate(&model, &prompts, &cfg).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        let single = generate(&model, std::slice::from_ref(p), &cfg).unwrap();
        assert_eq!(&single[0], got);
        assert_eq!(got.len(), 12);
        // greedy continuation equals the argmax of a full forward over prompt + generated tokens
        let mut all = p.clone();
        all.extend_from_slice(&got[..got.len() - 1]);
        let t = Tensor::new(vec![all.clone()], &Device::Cpu).unwrap();
        let logits = model.forward(&t, None).unwrap().get(0).unwrap();
        let argmax: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        assert_eq!(&argmax[p.len() - 1..], &got[..]);
    }
}

#[test]
fn sampling_is_seeded_and_stops_on_stop_tokens() {
    let name = "tiny-gpt-oss";
    let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let prompt = vec![vec![5u32, 6, 7, 8]];
    let cfg = GenerationConfig {
        max_new_tokens: 20,
        temperature: 0.8,
        top_p: 0.9,
        top_k: 50,
        seed: 7,
        stop_tokens: vec![],
        pad_token_id: 0,
    };
    let a = generate(&model, &prompt, &cfg).unwrap();
    let b = generate(&model, &prompt, &cfg).unwrap();
    assert_eq!(a, b);
    assert_eq!(a[0].len(), 20);
    // stop at the first occurrence of the 5th sampled token
    let stop = a[0][4];
    let first = a[0].iter().position(|&t| t == stop).unwrap();
    let cfg2 = GenerationConfig {
        stop_tokens: vec![stop],
        ..cfg.clone()
    };
    let mut g = Generator::new(&model, &prompt, cfg2).unwrap();
    let mut streamed = Vec::new();
    while let Some(step) = g.step().unwrap() {
        streamed.push(step[0].unwrap());
    }
    assert_eq!(streamed, a[0][..=first].to_vec());
    // top_k = 1 is greedy
    let greedy = GenerationConfig {
        temperature: 0.0,
        ..cfg.clone()
    };
    let top1 = GenerationConfig { top_k: 1, ..cfg };
    assert_eq!(
        generate(&model, &prompt, &greedy).unwrap(),
        generate(&model, &prompt, &top1).unwrap()
    );
}

#[test]
fn packed_row_equals_separate_sequences() {
    // Two prefixes of the fixture's rows packed into one row: each segment must give transformers'
    // logits of its own sequence (positions restart, no attention across the boundary, sliding
    // window of 8 inside each segment).
    let name = "tiny-gpt-oss";
    let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let r = reference(name);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let lens = [25usize, 30];
    let mut packed = Vec::new();
    for (row, &len) in lens.iter().enumerate() {
        let part: Vec<u32> = ids
            .get(row)
            .unwrap()
            .narrow(0, 0, len)
            .unwrap()
            .to_vec1()
            .unwrap();
        packed.extend(part);
    }
    let total = packed.len();
    let input = Tensor::from_vec(packed, (1, total), &Device::Cpu).unwrap();
    let logits = model.forward_packed(&input, &lens).unwrap();
    let mut offset = 0;
    for (row, &len) in lens.iter().enumerate() {
        let want = r["logits"].get(row).unwrap().narrow(0, 0, len).unwrap();
        let got = logits.get(0).unwrap().narrow(0, offset, len).unwrap();
        let err = max_abs(&got, &want);
        assert!(err <= 1e-4, "packed segment {row}: max |Δ| = {err}");
        offset += len;
    }
    assert!(model.forward_packed(&input, &[25, 29]).is_err());
    assert!(model.packed_attention_context(&[25, 0, 30]).is_err());
}
