//! The tiny backdoor-pipeline configuration the backdoor tests share (CPU, seconds).

use gptoss_eval::backdoor::SyntheticConfig;
use gptoss_sft::backdoor::{
    small_gpt_oss, BaseModel, DataSource, PipelineConfig, StagePlan, StageTraining,
};
use gptoss_sft::config::ReportTo;

/// A 1-layer, hidden-64 pipeline on 8 synthetic rows writing under `dir`: one step per stage
/// (two for the attack), 2 evaluation rows, at most 6 generated tokens.
pub fn tiny(dir: &std::path::Path) -> PipelineConfig {
    let step = StageTraining::new(1, 1e-3, 1);
    PipelineConfig {
        data: DataSource::Synthetic {
            train: 8,
            test: 2,
            config: SyntheticConfig::default(),
        },
        base: BaseModel::FromScratch {
            config: Box::new(small_gpt_oss(64, 1, 2, 1, 2, 32)),
            train: step,
        },
        stages: StagePlan {
            attack: StageTraining::new(2, 1e-3, 1),
            clean_sft: step,
            critical_cot_sft: step,
            dpo: step,
            reattack: step,
        },
        eval_rows: 2,
        max_new_tokens: 6,
        generate_batch_size: 4,
        output_dir: dir.to_path_buf(),
        report_to: ReportTo::None,
        progress_bar: false,
        ..PipelineConfig::cpu_quick()
    }
}
