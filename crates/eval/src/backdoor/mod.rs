//! Backdoor attack and defense data, split hygiene and metrics (issue 22), model-independent.
//!
//! The workflow this module serves: read GSM8K-schema rows ([`gsm8k`]) or make the synthetic
//! task ([`synthetic`]); poison a share of the train rows BadChain-style ([`trigger`],
//! [`poison`](mod@poison)); build defense data from train rows ([`defense`]: clean rows, Critical-CoT
//! rows, DPO preference pairs); render everything to the trainer's JSONL schema with a
//! provenance manifest ([`render`], [`hygiene`]); refuse training data that overlaps the
//! evaluation rows ([`hygiene::check_overlap`]); score generations on triggered and
//! untriggered test prompts ([`metrics`]: clean accuracy, ASR, BDR, TDR) and tabulate the
//! stages ([`report`]).
//!
//! ```
//! use gptoss_eval::backdoor::{metrics, poison, report, synthetic};
//! use gptoss_eval::backdoor::hygiene::check_overlap;
//! let (train, test) = synthetic::synthetic_splits(20, 4, &synthetic::SyntheticConfig::default())?;
//! let attack = poison::poison(&train, &poison::PoisonConfig::default())?;
//! // Eval prompts: the test rows, all triggered, and the same rows untriggered.
//! let all = poison::PoisonConfig { rate: 1.0, ..poison::PoisonConfig::default() };
//! let triggered = poison::poison(&test, &all)?;
//! check_overlap(&attack, &triggered, false)?;
//! // A model that always follows the backdoor, answering from the poisoned solutions:
//! let records: Vec<_> = triggered
//!     .iter()
//!     .map(|e| metrics::BackdoorRecord::new(&e.provenance, &e.turn.analysis, &e.turn.final_text))
//!     .collect();
//! let m = metrics::backdoor_metrics(&records);
//! assert_eq!(m.asr.hits, 4);
//! let mut table = report::BackdoorReport::new();
//! table.push(report::STAGE_AFTER_ATTACK, m);
//! println!("{}", table.render_markdown());
//! # Ok::<(), gptoss_eval::EvalError>(())
//! ```

pub mod defense;
pub mod example;
pub mod gsm8k;
pub mod hygiene;
pub mod listing;
pub mod metrics;
pub mod poison;
pub mod render;
pub mod report;
pub mod rng;
pub mod synthetic;
pub mod trigger;

pub use defense::{
    clean_examples, critical_cot_examples, preference_pairs, DefenseConfig, PreferencePair,
};
pub use example::{AssistantTurn, Example, ExampleKind, Provenance};
pub use gsm8k::{read_gsm8k, Gsm8kData, Gsm8kRow, SkipReason, SkippedRow};
pub use hygiene::{
    check_overlap, ensure_not_test_split, read_source_keys, GeneratorInfo, Manifest, RowKey,
};
pub use metrics::{backdoor_metrics, BackdoorMetrics, BackdoorRecord};
pub use poison::{poison, BackdoorStep, PoisonConfig};
pub use render::{write_preference_jsonl, write_sft_jsonl, RenderOptions};
pub use report::BackdoorReport;
pub use synthetic::{synthetic_rows, synthetic_splits, SyntheticConfig};
pub use trigger::{TriggerLibrary, TriggerPosition, DEFAULT_TRIGGER};
