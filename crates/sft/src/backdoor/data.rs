//! The pipeline's rows: train and evaluation rows from the source, every stage's training data
//! (written as JSONL with its provenance manifest), the evaluation examples, and the split
//! hygiene check that runs before any training.

use std::path::{Path, PathBuf};

use gptoss_eval::backdoor::gsm8k::{TEST_SPLIT, TRAIN_SPLIT};
use gptoss_eval::backdoor::hygiene::check_overlap_named;
use gptoss_eval::backdoor::poison::clean_example;
use gptoss_eval::backdoor::{
    clean_examples, critical_cot_examples, poison, preference_pairs, read_gsm8k, synthetic_splits,
    write_preference_jsonl, write_sft_jsonl, DefenseConfig, Example, GeneratorInfo, Gsm8kRow,
    PoisonConfig, PreferencePair, RenderOptions,
};

use super::config::{DataSource, PipelineConfig};
use crate::error::{Result, SftError};

/// The training data of every stage and the evaluation examples.
#[derive(Clone, Debug)]
pub struct PipelineData {
    /// Clean train rows (the base stage and the clean defense).
    pub clean: Vec<Example>,
    /// Train rows, `poison.rate` of them poisoned (the attack and the re-attack).
    pub poisoned: Vec<Example>,
    /// Train rows, `poison.rate` of them triggered with a Critical-CoT turn.
    pub critical_cot: Vec<Example>,
    /// Preference pairs on the triggered train rows.
    pub pairs: Vec<PreferencePair>,
    /// Evaluation prompts: every evaluation row untriggered, then every one triggered.
    pub eval: Vec<Example>,
    /// The overlapping `(split, row id)` pairs accepted with `allow_overlap` (empty otherwise).
    pub accepted_overlap: usize,
}

/// The (train rows, evaluation rows) of `cfg.data`: the train split, and the first
/// `cfg.eval_rows` rows of `cfg.eval_split`.
///
/// # Errors
/// An unreadable GSM8K source, or an evaluation split with no row.
pub fn source_rows(cfg: &PipelineConfig) -> Result<(Vec<Gsm8kRow>, Vec<Gsm8kRow>)> {
    let (train, others): (Vec<Gsm8kRow>, Vec<Gsm8kRow>) = match &cfg.data {
        DataSource::Synthetic {
            train,
            test,
            config,
        } => synthetic_splits(*train, *test, config)?,
        DataSource::Gsm8k(path) => {
            let data = read_gsm8k(path)?;
            if !data.skipped.is_empty() {
                eprintln!("{}", data.skipped_summary());
            }
            let train = data.split_rows(TRAIN_SPLIT).cloned().collect();
            let rest = data
                .rows
                .iter()
                .filter(|r| r.split != TRAIN_SPLIT)
                .cloned()
                .collect();
            (train, rest)
        }
    };
    let pool = if cfg.eval_split == TRAIN_SPLIT {
        &train
    } else {
        &others
    };
    let eval: Vec<Gsm8kRow> = pool
        .iter()
        .filter(|r| r.split == cfg.eval_split)
        .take(cfg.eval_rows)
        .cloned()
        .collect();
    if eval.is_empty() {
        return Err(SftError::config(
            "eval_split",
            format!(
                "the data has no row of split `{}` to evaluate on (expected e.g. `{TEST_SPLIT}`)",
                cfg.eval_split
            ),
        ));
    }
    if train.is_empty() {
        return Err(SftError::Dataset(format!(
            "the data has no `{TRAIN_SPLIT}` row to train on"
        )));
    }
    Ok((train, eval))
}

/// The defense configuration of a run: the attack's trigger settings and rate.
pub fn defense_config(poison: &PoisonConfig) -> DefenseConfig {
    DefenseConfig {
        poison: poison.clone(),
        ..DefenseConfig::default()
    }
}

impl PipelineData {
    /// Builds every stage's data from `train` and the evaluation examples from `eval`, then
    /// refuses any training set that shares a `(split, row id)` with the evaluation rows unless
    /// `cfg.allow_overlap` (the error names the stage and the first shared rows).
    pub fn build(cfg: &PipelineConfig, train: &[Gsm8kRow], eval: &[Gsm8kRow]) -> Result<Self> {
        let defense = defense_config(&cfg.poison);
        let mut eval_examples = eval
            .iter()
            .map(|r| clean_example(r, &cfg.poison.step))
            .collect::<gptoss_eval::Result<Vec<_>>>()?;
        let all = PoisonConfig {
            rate: 1.0,
            ..cfg.poison.clone()
        };
        eval_examples.extend(poison(eval, &all)?);
        let data = PipelineData {
            clean: clean_examples(train, &defense)?,
            poisoned: poison(train, &cfg.poison)?,
            critical_cot: critical_cot_examples(train, &defense)?,
            pairs: preference_pairs(train, &defense)?,
            eval: eval_examples,
            accepted_overlap: 0,
        };
        let eval_name = format!("the evaluation rows (split `{}`)", cfg.eval_split);
        let mut accepted = 0;
        for (name, keys) in [
            ("the clean training data", data.clean.as_slice()),
            ("the attack data", data.poisoned.as_slice()),
            ("the Critical-CoT data", data.critical_cot.as_slice()),
        ] {
            let shared =
                check_overlap_named(keys, name, &data.eval, &eval_name, cfg.allow_overlap)?;
            accepted = accepted.max(shared.len());
        }
        let shared = check_overlap_named(
            data.pairs.as_slice(),
            "the DPO preference data",
            &data.eval,
            &eval_name,
            cfg.allow_overlap,
        )?;
        Ok(PipelineData {
            accepted_overlap: accepted.max(shared.len()),
            ..data
        })
    }
}

/// The training files of a run, written under `<output_dir>/data/`.
#[derive(Clone, Debug)]
pub struct DataFiles {
    /// Clean SFT rows.
    pub clean: PathBuf,
    /// Poisoned SFT rows.
    pub poisoned: PathBuf,
    /// Critical-CoT SFT rows.
    pub critical_cot: PathBuf,
    /// Preference rows (TRL schema).
    pub pairs: PathBuf,
}

/// Writes the training sets of `data` into `dir` (each with its `.manifest.json`).
pub fn write_data_files(
    dir: &Path,
    data: &PipelineData,
    cfg: &PipelineConfig,
) -> Result<DataFiles> {
    std::fs::create_dir_all(dir).map_err(|e| SftError::io(dir, e))?;
    let opts = RenderOptions::default();
    let seed = cfg.poison.seed;
    let defense = defense_config(&cfg.poison);
    let files = DataFiles {
        clean: dir.join("clean.jsonl"),
        poisoned: dir.join("poisoned.jsonl"),
        critical_cot: dir.join("critical_cot.jsonl"),
        pairs: dir.join("preference_pairs.jsonl"),
    };
    let info = |name: &str| GeneratorInfo::new(name, seed, &defense);
    write_sft_jsonl(&files.clean, &data.clean, &opts, info("clean_defense")?)?;
    let poison_info = GeneratorInfo::new("poison", seed, &cfg.poison)?;
    write_sft_jsonl(&files.poisoned, &data.poisoned, &opts, poison_info)?;
    write_sft_jsonl(
        &files.critical_cot,
        &data.critical_cot,
        &opts,
        info("critical_cot")?,
    )?;
    write_preference_jsonl(&files.pairs, &data.pairs, &opts, info("preference_pairs")?)?;
    Ok(files)
}
