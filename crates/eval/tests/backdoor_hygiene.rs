//! Split hygiene: overlap refusal and `allow_overlap`, the test split refused for defense data,
//! manifests and per-row provenance.

use gptoss_eval::backdoor::defense::{
    clean_examples, critical_cot_examples, preference_pairs, DefenseConfig,
};
use gptoss_eval::backdoor::gsm8k::Gsm8kRow;
use gptoss_eval::backdoor::hygiene::{
    check_overlap, check_overlap_named, manifest_path, read_manifest, read_source_keys,
    GeneratorInfo, RowKey, SourceRows, MANIFEST_FORMAT,
};
use gptoss_eval::backdoor::poison::{poison, PoisonConfig};
use gptoss_eval::backdoor::render::{write_sft_jsonl, RenderOptions};
use gptoss_eval::backdoor::synthetic::{synthetic_splits, SyntheticConfig};
use gptoss_eval::EvalError;

fn splits() -> (Vec<Gsm8kRow>, Vec<Gsm8kRow>) {
    synthetic_splits(30, 25, &SyntheticConfig::default()).unwrap()
}

#[test]
fn training_on_train_rows_passes_the_check() {
    let (train, test) = splits();
    let attack = poison(&train, &PoisonConfig::default()).unwrap();
    let eval = poison(
        &test,
        &PoisonConfig {
            rate: 1.0,
            ..PoisonConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        check_overlap(&attack, &eval, false).unwrap(),
        Vec::<RowKey>::new()
    );
    assert!(critical_cot_examples(&train, &DefenseConfig::default()).is_ok());
}

#[test]
fn overlap_is_refused_unless_allowed() {
    let (train, test) = splits();
    // Defense data built from the test split (as the seed repo did), explicitly allowed here.
    let allow = DefenseConfig {
        allow_test_split: true,
        ..DefenseConfig::default()
    };
    let mut defense = clean_examples(&test, &allow).unwrap();
    defense.extend(clean_examples(&train, &allow).unwrap());
    let err =
        check_overlap_named(&defense, "defense.jsonl", &test, "test rows", false).unwrap_err();
    match &err {
        EvalError::Overlap { count, listing, .. } => {
            assert_eq!(*count, 25);
            assert!(
                listing.starts_with("(test, 0), (test, 1), (test, 2)"),
                "{listing}"
            );
            assert!(
                listing.contains("(test, 19)") && !listing.contains("(test, 20)"),
                "{listing}"
            );
            assert!(listing.ends_with(" and 5 more (25 in all)"), "{listing}");
        }
        other => panic!("expected an overlap error, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.starts_with("defense.jsonl shares 25 source row(s) with test rows"),
        "{msg}"
    );
    assert!(msg.contains("--allow-overlap"), "{msg}");

    let shared = check_overlap(&defense, &test, true).unwrap();
    assert_eq!(shared.len(), 25);
    assert_eq!(shared[0], RowKey::new("test", 0));
    // A partial overlap lists just the shared pairs.
    let eval = vec![
        RowKey::new("test", 3),
        RowKey::new("train", 99),
        RowKey::new("test", 3),
    ];
    let err = check_overlap(&defense, &eval, false).unwrap_err();
    assert!(matches!(&err, EvalError::Overlap { count: 1, listing, .. } if listing == "(test, 3)"));
}

#[test]
fn defense_data_refuses_the_test_split_by_default() {
    let (train, test) = splits();
    let mut mixed = train[..3].to_vec();
    mixed.extend(test[..2].iter().cloned());
    let cfg = DefenseConfig::default();
    for err in [
        clean_examples(&mixed, &cfg).map(|_| ()).unwrap_err(),
        critical_cot_examples(&mixed, &cfg).map(|_| ()).unwrap_err(),
        preference_pairs(&mixed, &cfg).map(|_| ()).unwrap_err(),
    ] {
        match &err {
            EvalError::TestSplit {
                split,
                count,
                listing,
                ..
            } => {
                assert_eq!((split.as_str(), *count), ("test", 2));
                assert_eq!(listing, "row ids 0, 1");
            }
            other => panic!("expected a test-split error, got {other}"),
        }
        assert!(err.to_string().contains("allow_test_split"));
    }
    let allow = DefenseConfig {
        allow_test_split: true,
        ..DefenseConfig::default()
    };
    assert_eq!(clean_examples(&mixed, &allow).unwrap().len(), 5);
}

#[test]
fn files_carry_their_source_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = splits();
    let cfg = PoisonConfig {
        seed: 9,
        ..PoisonConfig::default()
    };
    let examples = poison(&train, &cfg).unwrap();
    let path = dir.path().join("attack.jsonl");
    let info = GeneratorInfo::new("poison", cfg.seed, &cfg).unwrap();
    let manifest = write_sft_jsonl(&path, &examples, &RenderOptions::default(), info).unwrap();

    let m = read_manifest(&manifest_path(&path)).unwrap();
    assert_eq!(m, manifest);
    assert_eq!(m.format, MANIFEST_FORMAT);
    assert_eq!(m.file, "attack.jsonl");
    assert_eq!((m.rows, m.triggered_rows, m.poisoned_rows), (30, 15, 15));
    assert_eq!(m.splits.keys().collect::<Vec<_>>(), vec!["train"]);
    assert_eq!(m.splits["train"], (0..30).collect::<Vec<_>>());
    assert_eq!(m.generator.seed, 9);
    assert_eq!(m.generator.config["rate"], 0.5);
    assert_eq!(
        m.generator.config["triggers"]["phrases"][0],
        " In arcane parlance"
    );

    let keys = read_source_keys(&path).unwrap();
    assert_eq!(keys, examples.source_keys());
    // Without the manifest the keys come from the rows themselves.
    std::fs::remove_file(manifest_path(&path)).unwrap();
    assert_eq!(read_source_keys(&path).unwrap(), keys);
    // A row without provenance is an error naming the line.
    let text = std::fs::read_to_string(&path).unwrap() + "{\"messages\": []}\n";
    std::fs::write(&path, text).unwrap();
    let err = read_source_keys(&path).unwrap_err().to_string();
    assert!(
        err.contains("attack.jsonl line 31") && err.contains("source_row_id"),
        "{err}"
    );
}
