//! Merging an adapter into a model whose experts are MXFP4-resident (decoded inside the expert
//! matmuls) gives the logits of merging it into the same model with dequantized experts, and
//! unmerging restores the resident weights exactly.

use candle_core::{DType, Device, Tensor};
use gptoss_lora::{InitLoraWeights, LoraConfig, LoraModel, TargetModules};
use gptoss_model::{
    load_with, write_synthetic_checkpoint, Config, ExpertLoading, GptOssForCausalLM, LoadOptions,
    SyntheticOptions,
};

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap_or(f32::INFINITY)
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        // random B too, so that every delta is non-zero
        init_lora_weights: InitLoraWeights::Bool(false),
        target_modules: Some(TargetModules::all_linear()),
        target_parameters: Some(vec![
            "0.mlp.experts.gate_up_proj".into(),
            "1.mlp.experts.down_proj".into(),
        ]),
        ..LoraConfig::default()
    }
}

fn resident(m: &GptOssForCausalLM) -> Vec<bool> {
    m.model
        .layers
        .iter()
        .map(|l| l.mlp.experts.packed().is_some())
        .collect()
}

#[test]
fn merge_into_resident_experts_equals_merge_into_dense() {
    let dir = std::env::temp_dir().join(format!("gptoss-merge-resident-{}", std::process::id()));
    let cfg = Config::tiny();
    let opts = SyntheticOptions {
        seed: 11,
        ..SyntheticOptions::default()
    };
    write_synthetic_checkpoint(&dir, &cfg, &opts).unwrap();
    let load = |experts| {
        let opts = LoadOptions {
            dtype: DType::F32,
            experts,
        };
        load_with(&dir, &Device::Cpu, &opts).unwrap()
    };
    let ids = Tensor::new(&[[5u32, 17, 3, 99, 250, 7, 1, 42]], &Device::Cpu).unwrap();
    let mut logits = Vec::new();
    for experts in [ExpertLoading::Resident, ExpertLoading::Dequantize] {
        let mut model = load(experts);
        let base = model.forward(&ids, None).unwrap();
        let mut lora = LoraModel::new(&mut model, lora_config(), 7).unwrap();
        let unmerged = model.forward(&ids, None).unwrap();
        assert!(
            max_abs(&unmerged, &base) > 1e-3,
            "the adapter must change the logits"
        );
        lora.merge(&mut model).unwrap();
        let merged = model.forward(&ids, None).unwrap();
        let d = max_abs(&merged, &unmerged);
        assert!(d <= 1e-4, "{experts:?}: merged vs unmerged differ by {d}");
        if experts == ExpertLoading::Resident {
            // both layers carry an expert adapter: merged dense
            assert_eq!(resident(&model), vec![false, false]);
        }
        logits.push(merged);
        lora.unmerge(&mut model).unwrap();
        if experts == ExpertLoading::Resident {
            assert_eq!(resident(&model), vec![true, true]);
        }
        let back = model.forward(&ids, None).unwrap();
        let d = max_abs(&back, &unmerged);
        assert!(d <= 1e-5, "{experts:?}: unmerged again differs by {d}");
        lora.unload(&mut model).unwrap();
        let d = max_abs(&model.forward(&ids, None).unwrap(), &base);
        assert!(
            d <= 1e-5,
            "{experts:?}: unloaded differs from the base by {d}"
        );
    }
    let d = max_abs(&logits[0], &logits[1]);
    assert!(d <= 1e-4, "resident vs dense merged logits differ by {d}");
    let _ = std::fs::remove_dir_all(&dir);
}
