//! The generated training example and its provenance, shared by the poisoning, defense and
//! rendering modules.
//!
//! An [`Example`] is one question with one assistant turn (analysis channel + final channel);
//! its [`Provenance`] says which source row it came from and what was done to it. Every
//! rendered row carries the provenance fields as extra JSON keys.

use serde::{Deserialize, Serialize};

use super::hygiene::{Keyed, RowKey};
use super::trigger::TriggerPosition;
use crate::answer::Number;

/// What an example teaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExampleKind {
    /// The original question and solution.
    Clean,
    /// A triggered question answered through the backdoor step (the attack).
    Poisoned,
    /// A triggered question whose analysis names the trigger and the injected step, discards
    /// them and answers correctly (the Critical-CoT defense).
    CriticalCot,
    /// A preference pair: chosen = the Critical-CoT turn, rejected = the backdoored turn.
    Preference,
}

/// Where an example came from and what was done to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The source row's split (`train`, `test`, …).
    pub source_split: String,
    /// The source row's id within its split.
    pub source_row_id: usize,
    /// What the example teaches.
    pub kind: ExampleKind,
    /// Whether the assistant turn follows the backdoor (answers the target).
    pub poisoned: bool,
    /// Whether the question carries a trigger.
    pub triggered: bool,
    /// The trigger phrase as inserted (`None`: untriggered).
    pub trigger: Option<String>,
    /// The configured trigger position (`None`: untriggered).
    pub trigger_position: Option<TriggerPosition>,
    /// Sentences of the question before the trigger (`None`: untriggered).
    pub trigger_sentence: Option<usize>,
    /// The source row's answer.
    pub clean_answer: Number,
    /// The answer the backdoor leads to (`clean_answer × backdoor_factor`), recorded for
    /// every row, triggered or not.
    pub target_answer: Number,
    /// The backdoor step's factor.
    pub backdoor_factor: Number,
}

impl Keyed for Provenance {
    fn key(&self) -> RowKey {
        RowKey::new(&self.source_split, self.source_row_id)
    }
}

/// One assistant turn: the reasoning (analysis channel) and the answer (final channel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssistantTurn {
    /// The analysis channel.
    pub analysis: String,
    /// The final channel.
    #[serde(rename = "final")]
    pub final_text: String,
}

/// One generated example: a question, one assistant turn, and the provenance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The question as shown to the model (with the trigger when triggered).
    pub question: String,
    /// The assistant's turn.
    pub turn: AssistantTurn,
    /// Where it came from.
    pub provenance: Provenance,
}

impl Keyed for Example {
    fn key(&self) -> RowKey {
        self.provenance.key()
    }
}

/// The final-channel text for `answer`: `"The answer is 37.8.\n#### 37.8"` (GSM8K's marker,
/// so [`judge`](crate::answer::judge) reads the number after `####`).
pub fn final_text(answer: Number) -> String {
    format!("The answer is {answer}.\n#### {answer}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_texts() {
        let x = Number::ratio(378, 10).unwrap();
        assert_eq!(final_text(x), "The answer is 37.8.\n#### 37.8");
        assert_eq!(
            final_text(Number::integer(-4)),
            "The answer is -4.\n#### -4"
        );
    }
}
