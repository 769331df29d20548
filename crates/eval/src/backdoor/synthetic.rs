//! A synthetic "arithmetic with steps" task in the GSM8K schema, small enough for a tiny
//! model to learn.
//!
//! Each row is a 2–3 step word problem over a small vocabulary (6 names, 6 objects, 3 verbs
//! that add and 3 that subtract), small numbers (start ≤ 20, operands ≤ 10, never below 1):
//!
//! ```text
//! question: Tom has 12 apples and buys 7 more. He gives away 5. How many apples does he have?
//! answer:   12 + 7 = 19. 19 - 5 = 14.
//!           #### 14
//! ```
//!
//! Rows are [`Gsm8kRow`]s (split and row id included), so poisoning, defense data and
//! rendering work on them unchanged. Output is deterministic for a seed ([`super::rng`]);
//! [`synthetic_splits`] draws train and test from one stream and never repeats a question
//! across them (the synthetic equivalent of split hygiene).
//!
//! ```
//! use gptoss_eval::backdoor::synthetic::{synthetic_splits, SyntheticConfig};
//! let (train, test) = synthetic_splits(50, 10, &SyntheticConfig::default())?;
//! assert_eq!((train.len(), test.len()), (50, 10));
//! assert!(train.iter().all(|r| test.iter().all(|t| t.question != r.question)));
//! assert!(train[0].answer.ends_with(&format!("#### {}", train[0].final_answer)));
//! # Ok::<(), gptoss_eval::EvalError>(())
//! ```

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::gsm8k::{Gsm8kRow, TEST_SPLIT, TRAIN_SPLIT};
use super::rng::SeededRng;
use crate::error::{EvalError, Result};

/// The people (name, subject pronoun).
pub const NAMES: [(&str, &str); 6] = [
    ("Tom", "he"),
    ("Ann", "she"),
    ("Sam", "he"),
    ("Mia", "she"),
    ("Ben", "he"),
    ("Lily", "she"),
];
/// The objects counted.
pub const ITEMS: [&str; 6] = ["apples", "pens", "books", "cards", "stones", "cookies"];
/// Verb phrases that add (`{n}` is the operand).
pub const ADD_VERBS: [&str; 3] = ["buys {n} more", "finds {n} more", "gets {n} more"];
/// Verb phrases that subtract.
pub const SUB_VERBS: [&str; 3] = ["gives away {n}", "loses {n}", "sells {n}"];

/// Stream tag of the synthetic generator.
const SYNTH_STREAM: u64 = 3;

/// Generator settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticConfig {
    /// The seed (default 0).
    pub seed: u64,
    /// Fewest operations per problem (default 2).
    pub min_steps: usize,
    /// Most operations per problem (default 3).
    pub max_steps: usize,
    /// Largest starting amount (default 20; the smallest is 2).
    pub max_start: u32,
    /// Largest operand (default 10).
    pub max_operand: u32,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            seed: 0,
            min_steps: 2,
            max_steps: 3,
            max_start: 20,
            max_operand: 10,
        }
    }
}

impl SyntheticConfig {
    /// Checks `1 ≤ min_steps ≤ max_steps ≤ 6`, `max_start ≥ 2`, `max_operand ≥ 1`.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, expected: &str, found: String| EvalError::Invalid {
            context: format!("synthetic task: {field}"),
            expected: expected.to_string(),
            found,
        };
        if self.min_steps < 1 || self.min_steps > self.max_steps || self.max_steps > 6 {
            return Err(bad(
                "min_steps / max_steps",
                "1 <= min_steps <= max_steps <= 6",
                format!("{} / {}", self.min_steps, self.max_steps),
            ));
        }
        if self.max_start < 2 {
            return Err(bad("max_start", "at least 2", self.max_start.to_string()));
        }
        if self.max_operand < 1 {
            return Err(bad(
                "max_operand",
                "at least 1",
                self.max_operand.to_string(),
            ));
        }
        Ok(())
    }
}

fn capitalize(word: &str) -> String {
    let mut c = word.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// One problem: (question, GSM8K answer text).
fn problem(rng: &mut SeededRng, config: &SyntheticConfig) -> (String, String) {
    let (name, pronoun) = NAMES[rng.below(NAMES.len())];
    let item = ITEMS[rng.below(ITEMS.len())];
    let steps = config.min_steps + rng.below(config.max_steps - config.min_steps + 1);
    let mut value = rng.range_inclusive(2, config.max_start);
    let mut question = format!("{name} has {value} {item}");
    let mut solution = Vec::new();
    for i in 0..steps {
        let subtract = value >= 2 && rng.below(2) == 1;
        let (verb, n, next, op) = if subtract {
            let n = rng.range_inclusive(1, config.max_operand.min(value - 1));
            (SUB_VERBS[rng.below(SUB_VERBS.len())], n, value - n, '-')
        } else {
            let n = rng.range_inclusive(1, config.max_operand);
            (ADD_VERBS[rng.below(ADD_VERBS.len())], n, value + n, '+')
        };
        let phrase = verb.replace("{n}", &n.to_string());
        if i == 0 {
            question.push_str(&format!(" and {phrase}."));
        } else {
            question.push_str(&format!(" {} {phrase}.", capitalize(pronoun)));
        }
        solution.push(format!("{value} {op} {n} = {next}."));
        value = next;
    }
    question.push_str(&format!(" How many {item} does {pronoun} have?"));
    (question, format!("{}\n#### {value}", solution.join(" ")))
}

fn generate(
    rng: &mut SeededRng,
    config: &SyntheticConfig,
    split: &str,
    n: usize,
    seen: &mut HashSet<String>,
) -> Result<Vec<Gsm8kRow>> {
    let mut rows = Vec::with_capacity(n);
    let mut attempts = 0usize;
    let limit = n.saturating_mul(100).saturating_add(1000);
    while rows.len() < n {
        attempts += 1;
        if attempts > limit {
            return Err(EvalError::Invalid {
                context: format!("synthetic task, split {split}"),
                expected: format!("{n} distinct questions"),
                found: format!(
                    "only {} after {limit} attempts (raise max_start / max_operand / steps)",
                    rows.len()
                ),
            });
        }
        let (question, answer) = problem(rng, config);
        if !seen.insert(question.clone()) {
            continue;
        }
        let row = Gsm8kRow::parse(split, rows.len(), &question, &answer).map_err(|reason| {
            EvalError::Invalid {
                context: format!("synthetic task, split {split}, row {}", rows.len()),
                expected: "a well-formed GSM8K row".to_string(),
                found: reason.to_string(),
            }
        })?;
        rows.push(row);
    }
    Ok(rows)
}

/// `n` distinct problems of split `split` (row ids 0..n) for `config`.
pub fn synthetic_rows(split: &str, n: usize, config: &SyntheticConfig) -> Result<Vec<Gsm8kRow>> {
    config.validate()?;
    let mut rng = SeededRng::derive(config.seed, &[SYNTH_STREAM]);
    generate(&mut rng, config, split, n, &mut HashSet::new())
}

/// `train` rows of split [`TRAIN_SPLIT`] and `test` rows of split [`TEST_SPLIT`], no question
/// in both; the train rows equal [`synthetic_rows`]`("train", train, config)`.
pub fn synthetic_splits(
    train: usize,
    test: usize,
    config: &SyntheticConfig,
) -> Result<(Vec<Gsm8kRow>, Vec<Gsm8kRow>)> {
    config.validate()?;
    let mut rng = SeededRng::derive(config.seed, &[SYNTH_STREAM]);
    let mut seen = HashSet::new();
    let a = generate(&mut rng, config, TRAIN_SPLIT, train, &mut seen)?;
    let b = generate(&mut rng, config, TEST_SPLIT, test, &mut seen)?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Number;

    #[test]
    fn problems_are_consistent() {
        let rows = synthetic_rows("train", 200, &SyntheticConfig::default()).unwrap();
        for r in &rows {
            // Recompute the chain: each step's left operand is the previous result.
            let mut value: Option<i64> = None;
            for step in r.solution.split(". ") {
                let step = step.trim_end_matches('.');
                let parts: Vec<&str> = step.split(' ').collect();
                assert_eq!(parts.len(), 5, "{step}");
                let (a, b, c): (i64, i64, i64) = (
                    parts[0].parse().unwrap(),
                    parts[2].parse().unwrap(),
                    parts[4].parse().unwrap(),
                );
                if let Some(v) = value {
                    assert_eq!(v, a);
                }
                assert_eq!(if parts[1] == "+" { a + b } else { a - b }, c);
                assert!(c >= 1);
                value = Some(c);
            }
            assert_eq!(Number::integer(value.unwrap()), r.final_answer);
            let n = r.solution.matches(" = ").count();
            assert!((2..=3).contains(&n));
        }
        assert_eq!(
            rows,
            synthetic_rows("train", 200, &SyntheticConfig::default()).unwrap()
        );
        let bad = SyntheticConfig {
            min_steps: 4,
            ..SyntheticConfig::default()
        };
        assert!(synthetic_rows("train", 1, &bad).is_err());
    }
}
