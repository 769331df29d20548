//! GSM8K-style answer extraction and matching on hand-written cases.

use gptoss_eval::answer::{
    answers_match, extract_reference, judge, predicted_number, Answer, Number,
};

fn num(s: &str) -> Answer {
    Answer::Number(s.parse::<Number>().unwrap())
}

/// (reference solution, expected reference answer)
const REFERENCES: &[(&str, &str)] = &[
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("The loss is 5 - 8 = -3 dollars.\n#### -3", "-3"),
    ("#### 3.50", "3.5"),
    ("#### $18", "18"),
    ("#### 18 dollars", "18"),
    ("#### 25%", "25"),
    ("#### 0.75", "3/4"),
    ("42", "42"),
    ("The answer is 42.", "42"),
    ("#### 1,000,000", "1000000"),
    ("#### +7", "7"),
    ("#### −12", "-12"),
    ("#### ٤٢", "42"),
];

#[test]
fn reference_answers() {
    for (reference, want) in REFERENCES {
        assert_eq!(
            extract_reference(reference),
            Some(num(want)),
            "reference {reference:?}"
        );
    }
    assert_eq!(
        extract_reference("#### Paris"),
        Some(Answer::Text("paris".to_string()))
    );
    assert_eq!(
        extract_reference("  The   Eiffel Tower. "),
        Some(Answer::Text("the eiffel tower".to_string()))
    );
    assert_eq!(extract_reference("#### "), None);
    assert_eq!(extract_reference(""), None);
}

/// (final-channel text, reference solution, correct?, predicted answer or "" for none)
const CASES: &[(&str, &str, bool, &str)] = &[
    // `####` in the prediction wins over later numbers.
    (
        "She sold 72 clips in total.\n#### 72",
        "#### 72",
        true,
        "72",
    ),
    ("#### 72\nThat took 3 steps.", "#### 72", true, "72"),
    ("First 48, then 24.\n####72", "#### 72", true, "72"),
    // Last number when there is no `####`.
    ("48 + 24 = 72", "#### 72", true, "72"),
    (
        "Natalia sold **72** clips altogether.",
        "#### 72",
        true,
        "72",
    ),
    ("The answer is 72.", "#### 72", true, "72"),
    ("72 clips were sold, not 24.", "#### 72", false, "24"),
    // Thousands separators.
    ("The total is 1,234.", "#### 1234", true, "1234"),
    ("The total is 1234.", "#### 1,234", true, "1234"),
    (
        "It costs 1,234,567 dollars.",
        "#### 1234567",
        true,
        "1234567",
    ),
    (
        "Il faut 1\u{202F}234 € au total.",
        "#### 1234",
        true,
        "1234",
    ),
    ("Es sind 1\u{00A0}234 Äpfel.", "#### 1234", true, "1234"),
    // Negatives and signs.
    ("The balance is -3 dollars.", "#### -3", true, "-3"),
    ("The balance is −3.", "#### -3", true, "-3"),
    ("The change is +5.", "#### 5", true, "5"),
    ("35-12=23", "#### 23", true, "23"),
    (
        "The temperature fell to -4, i.e. 4 degrees below zero.",
        "#### -4",
        false,
        "4",
    ),
    // Decimals.
    ("Each costs $3.50.", "#### 3.5", true, "3.5"),
    ("Each costs 3.5 dollars.", "#### 3.50", true, "3.5"),
    ("It weighs 2.0 kg.", "#### 2", true, "2"),
    ("Il reste 0,45 kg.", "#### 0.45", true, "0.45"),
    ("0.2 × 50 = 10.", "#### 10", true, "10"),
    // Currency and units.
    ("$18", "#### 18", true, "18"),
    ("She makes 18 dollars every day.", "#### 18", true, "18"),
    ("The discount is 25%.", "#### 25", true, "25"),
    ("Das sind 18 €.", "#### 18", true, "18"),
    ("It takes 150 minutes.", "#### 150", true, "150"),
    // Fractions.
    ("Half of them, so 1/2.", "#### 0.5", true, "0.5"),
    ("3/4 of the cake is left.", "#### 0.75", true, "0.75"),
    ("35/5 = 7", "#### 7", true, "7"),
    // Wrong numbers.
    ("The answer is 71.", "#### 72", false, "71"),
    ("The answer is 7.2", "#### 72", false, "7.2"),
    // No number at all.
    ("I am not sure.", "#### 72", false, ""),
    ("", "#### 72", false, ""),
    // Non-ASCII digits.
    ("الجواب ٧٢", "#### 72", true, "72"),
    ("उत्तर ७२ है।", "#### 72", true, "72"),
    // Text references: exact match after normalisation.
    ("Paris", "#### Paris", true, "paris"),
    ("  paris. ", "Paris", true, "paris"),
    (
        "The capital is Paris.",
        "Paris",
        false,
        "the capital is paris",
    ),
    ("New   York", "new york", true, "new york"),
];

#[test]
fn gsm8k_cases() {
    assert!(CASES.len() >= 30);
    let mut failures = Vec::new();
    for (i, (final_text, reference, correct, predicted)) in CASES.iter().enumerate() {
        let Some(v) = answers_match(final_text, reference) else {
            failures.push(format!("case {i}: reference {reference:?} gave no answer"));
            continue;
        };
        let got_pred = v
            .predicted
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        if v.correct != *correct || got_pred != *predicted {
            failures.push(format!(
                "case {i}: {final_text:?} vs {reference:?}: correct {} (want {correct}), predicted {got_pred:?} (want {predicted:?})",
                v.correct
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn no_reference_is_skipped_not_wrong() {
    assert_eq!(answers_match("72", ""), None);
    assert_eq!(answers_match("72", "#### "), None);
}

#[test]
fn judge_and_predicted_number_agree() {
    let r = num("72");
    assert!(judge("so 72", &r).correct);
    assert_eq!(predicted_number("a 3 b 4 c"), Some(Number::integer(4)));
    assert_eq!(predicted_number("#### 5, then 6"), Some(Number::integer(5)));
    assert_eq!(predicted_number("7 #### "), Some(Number::integer(7)));
    assert_eq!(predicted_number("nothing"), None);
}
