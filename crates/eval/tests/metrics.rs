//! Aggregate metrics on hand-made generations, against values computed by hand.

use gptoss_eval::format::{check_completion, completion_ids};
use gptoss_eval::{
    default_detector, evaluate, Completion, Language, ModelEval, Proportion, RowRecord,
};
use gptoss_harmony::{ids, HarmonyTokenizer};

use Language::*;

const RETURN: Option<u32> = Some(ids::RETURN);

/// (analysis, final, stop, requested, expected final language, reference)
type Spec = (
    Option<&'static str>,
    Option<&'static str>,
    Option<u32>,
    Option<Language>,
    Option<Language>,
    Option<&'static str>,
);

const ROWS: [Spec; 10] = [
    // 0, 1: German, correct answers (built from token ids, so token lengths are known).
    (Some("Der Nutzer fragt nach der Summe von 23 und 12. 23 + 12 = 35, das passt."), Some("35"), RETURN, Some(German), None, Some("#### 35")),
    (Some("Der Nutzer möchte das Produkt von 4 und 14 wissen. 4 × 14 = 56, denn 4 × 10 = 40 plus der Rest."), Some("56"), RETURN, Some(German), None, Some("#### 56")),
    // 2: German requested, English written; wrong answer.
    (Some("The user asks how many eggs are left. 5 + 8 = 13, minus one broken egg gives 12."), Some("The answer is 12."), RETURN, Some(German), None, Some("#### 13")),
    // 3: French, final in French, correct.
    (Some("L'utilisateur veut savoir combien coûtent 5 cahiers à 4 euros. 5 × 4 = 20, donc 20 euros."), Some("Le résultat est de vingt euros pour les cahiers, donc 20."), RETURN, Some(French), Some(French), Some("#### 20")),
    // 4: Spanish, no reference (skipped by answer accuracy).
    (Some("El usuario pregunta cuántas manzanas quedan. 10 - 3 = 7, así que quedan siete."), Some("El resultado es que quedan siete manzanas en total: 7."), RETURN, Some(Spanish), Some(Spanish), None),
    // 5: no analysis channel (undetected → a miss for Italian), correct answer.
    (None, Some("42"), RETURN, Some(Italian), None, Some("#### 42")),
    // 6: no requested language (skipped by reasoning-language accuracy).
    (Some("L'utente chiede quanto costano 3 penne da 3 euro. 3 × 3 = 9, quindi sono 9 euro."), Some("Il risultato è che servono nove euro in tutto: 9."), RETURN, None, Some(Italian), Some("#### 9")),
    // 7: truncated inside the analysis: no final channel, no stop token; wrong answer.
    (Some("O usuário quer saber quantos livros sobram na estante depois de vender 7 de 12, então"), None, None, Some(Portuguese), None, Some("#### 5")),
    // 8: text reference, exact match.
    (Some("The user asks for the capital of France. That is Paris, a well-known fact."), Some("Paris"), RETURN, Some(English), None, Some("Paris")),
    // 9: stops with <|call|>: not a valid final answer format, answer still scored.
    (Some("The user wants the price of 2 tickets at 5 dollars each. 2 × 5 = 10 dollars."), Some("I think the answer is ten dollars in total, so 10 dollars."), Some(ids::CALL), Some(English), Some(English), Some("#### 10")),
];

fn records(tok: &HarmonyTokenizer) -> (Vec<RowRecord>, Vec<Vec<u32>>) {
    let mut generated = Vec::new();
    let recs = ROWS
        .iter()
        .enumerate()
        .map(
            |(i, &(analysis, final_text, stop, requested, expected_final, reference))| {
                let completion = if i < 2 {
                    let ids = completion_ids(tok, analysis, final_text.unwrap()).unwrap();
                    let c = check_completion(tok, &ids);
                    generated.push(ids);
                    c
                } else {
                    Completion::from_channels(analysis, final_text, stop)
                };
                RowRecord::new(i, completion)
                    .with_requested_language(requested)
                    .with_expected_final_language(expected_final)
                    .with_reference(reference)
            },
        )
        .collect();
    (recs, generated)
}

fn assert_prop(p: &Proportion, hits: usize, total: usize, ci: (f64, f64), what: &str) {
    assert_eq!((p.hits, p.total), (hits, total), "{what}: counts");
    assert!(
        (p.rate - hits as f64 / total as f64).abs() < 1e-12,
        "{what}: rate {}",
        p.rate
    );
    assert!(
        (p.ci95.0 - ci.0).abs() < 5e-5 && (p.ci95.1 - ci.1).abs() < 5e-5,
        "{what}: ci95 {:?}, want {ci:?}",
        p.ci95
    );
}

fn eval() -> (ModelEval, Vec<Vec<u32>>, HarmonyTokenizer) {
    let tok = HarmonyTokenizer::o200k_harmony().unwrap();
    let (recs, generated) = records(&tok);
    (
        evaluate("hand-made", recs, default_detector()),
        generated,
        tok,
    )
}

#[test]
fn per_row_judgements() {
    let (e, _, _) = eval();
    let detected: Vec<Option<Language>> = e.rows.iter().map(|r| r.analysis_language).collect();
    assert_eq!(
        detected,
        vec![
            Some(German),
            Some(German),
            Some(English),
            Some(French),
            Some(Spanish),
            None,
            Some(Italian),
            Some(Portuguese),
            Some(English),
            Some(English),
        ]
    );
    let finals: Vec<Option<Language>> = [3, 4, 6, 9]
        .iter()
        .map(|&i| e.rows[i].final_language)
        .collect();
    assert_eq!(
        finals,
        vec![Some(French), Some(Spanish), Some(Italian), Some(English)]
    );
    let ok: Vec<Option<bool>> = e.rows.iter().map(|r| r.reasoning_language_ok).collect();
    assert_eq!(
        ok,
        vec![
            Some(true),
            Some(true),
            Some(false),
            Some(true),
            Some(true),
            Some(false),
            None,
            Some(true),
            Some(true),
            Some(true)
        ]
    );
    let answers: Vec<Option<bool>> = e
        .rows
        .iter()
        .map(|r| r.answer.as_ref().map(|a| a.correct))
        .collect();
    assert_eq!(
        answers,
        vec![
            Some(true),
            Some(true),
            Some(false),
            Some(true),
            None,
            Some(true),
            Some(true),
            Some(false),
            Some(true),
            Some(true)
        ]
    );
    assert_eq!(e.rows[7].answer.as_ref().unwrap().predicted, None);
}

#[test]
fn aggregates_match_hand_computed_values() {
    let (e, generated, tok) = eval();
    let s = &e.summary;
    assert_eq!(s.rows, 10);

    // Reasoning language: 9 rows request one (row 6 skipped); misses are row 2 (English for
    // German) and row 5 (no analysis for Italian): 7/9.
    let rl = &s.reasoning_language;
    assert_prop(&rl.overall, 7, 9, (0.4526, 0.9368), "reasoning language");
    assert_eq!(rl.skipped, 1);
    assert_prop(&rl.per_language[&German], 2, 3, (0.2077, 0.9385), "German");
    assert_prop(&rl.per_language[&Italian], 0, 1, (0.0, 0.7935), "Italian");
    assert_prop(&rl.per_language[&French], 1, 1, (0.2065, 1.0), "French");
    assert_prop(&rl.per_language[&English], 2, 2, (0.3424, 1.0), "English");
    assert_eq!(rl.per_language.len(), 6);
    assert_eq!(rl.detected[&German]["German"], 2);
    assert_eq!(rl.detected[&German]["English"], 1);
    assert_eq!(rl.detected[&Italian]["none"], 1);

    // Final-channel language: rows 3, 4, 6, 9 expect one, all right; 6 rows skipped.
    assert_prop(
        &s.final_language.overall,
        4,
        4,
        (0.5101, 1.0),
        "final language",
    );
    assert_eq!(s.final_language.skipped, 6);

    // Answers: 9 rows with a reference (row 4 skipped); rows 2 and 7 wrong: 7/9.
    assert_prop(
        &s.answer_accuracy,
        7,
        9,
        (0.4526, 0.9368),
        "answer accuracy",
    );
    assert_eq!(s.answer_skipped, 1);

    // Format: all parse; row 7 has no stop and row 9 ends with <|call|>: 8/10 end with
    // <|return|>; row 5 lacks analysis, row 7 lacks final; valid = 0,1,2,3,4,6,8 = 7/10.
    let f = &s.format;
    assert_prop(&f.parses, 10, 10, (0.7225, 1.0), "parses");
    assert_prop(
        &f.ends_with_return,
        8,
        10,
        (0.4902, 0.9433),
        "ends with return",
    );
    assert_prop(&f.ends_with_call, 1, 10, (0.0179, 0.4042), "ends with call");
    assert_prop(&f.truncated, 1, 10, (0.0179, 0.4042), "truncated");
    assert_prop(&f.has_analysis, 9, 10, (0.5958, 0.9821), "has analysis");
    assert_prop(&f.has_final, 9, 10, (0.5958, 0.9821), "has final");
    assert_prop(&f.valid, 7, 10, (0.3968, 0.8922), "valid");

    // Token lengths are known for rows 0 and 1 only.
    let l = &s.lengths;
    let (g0, g1) = (generated[0].len(), generated[1].len());
    assert_eq!(
        (
            l.generated_tokens.count,
            l.generated_tokens.min,
            l.generated_tokens.max
        ),
        (2, g0.min(g1), g0.max(g1))
    );
    assert_eq!(l.generated_tokens.mean, (g0 + g1) as f64 / 2.0);
    assert_eq!(l.generated_tokens.median, (g0 + g1) as f64 / 2.0);
    let a0 = tok.encode(ROWS[0].0.unwrap()).unwrap().len();
    let a1 = tok.encode(ROWS[1].0.unwrap()).unwrap().len();
    assert_eq!(l.analysis_tokens.mean, (a0 + a1) as f64 / 2.0);
    assert_eq!((l.final_tokens.count, l.final_tokens.mean), (2, 1.0)); // "35", "56": one token each
                                                                       // Characters are known for every row; row 5 has no analysis, row 7 no final.
    assert_eq!((l.analysis_chars.count, l.analysis_chars.min), (10, 0));
    assert_eq!((l.final_chars.count, l.final_chars.min), (10, 0));
    let longest = ROWS
        .iter()
        .filter_map(|r| r.1)
        .map(|t| t.chars().count())
        .max()
        .unwrap();
    assert_eq!(l.final_chars.max, longest);
}

#[test]
fn empty_eval_is_all_zero_not_nan() {
    let e = evaluate("empty", Vec::new(), default_detector());
    let s = &e.summary;
    assert_eq!(s.rows, 0);
    assert_eq!(s.reasoning_language.overall, Proportion::new(0, 0));
    assert_eq!(s.format.valid.ci95, (0.0, 1.0));
    assert_eq!(s.lengths.generated_tokens.mean, 0.0);
    assert!(serde_json::to_string(s).unwrap().contains("\"rows\":0"));
}
