//! Reading GSM8K rows: malformed rows skipped with their row numbers, parquet files in the HF
//! layout (written here with the parquet crate), split names and row ids.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use gptoss_eval::answer::Number;
use gptoss_eval::backdoor::gsm8k::{read_gsm8k, SkipReason};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

fn row(q: &str, a: &str) -> String {
    serde_json::json!({"question": q, "answer": a}).to_string()
}

#[test]
fn malformed_jsonl_rows_are_skipped_with_row_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.jsonl");
    let lines = [
        row("What is 2 + 2?", "2 + 2 = <<2+2=4>>4\n#### 4"), // line 1, id 0: ok
        row("No marker?", "The answer is 5."),               // line 2, id 1
        serde_json::json!({"question": "Missing answer"}).to_string(), // line 3, id 2
        row("Words?", "Some steps\n#### five"),              // line 4, id 3
        "{not json".to_string(),                             // line 5, id 4
        String::new(),                                       // line 6: blank, not a record
        row("What is 10 - 3?", "10 - 3 = 7\n#### 7"),        // line 7, id 5: ok
        serde_json::json!({"question": 7, "answer": "x\n#### 1"}).to_string(), // line 8, id 6
        row("Only a marker?", "#### 3"),                     // line 9, id 7
        "[1, 2]".to_string(),                                // line 10, id 8
        row("What is 1,000 + 234?", "1,000 + 234 = 1,234\n#### 1,234"), // line 11, id 9: ok
    ];
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let data = read_gsm8k(&path).unwrap();

    let good: Vec<(usize, &str, Number)> = data
        .rows
        .iter()
        .map(|r| (r.row_id, r.split.as_str(), r.final_answer))
        .collect();
    assert_eq!(
        good,
        vec![
            (0, "test", Number::integer(4)),
            (5, "test", Number::integer(7)),
            (9, "test", Number::integer(1234)),
        ]
    );
    assert_eq!(data.rows[0].solution, "2 + 2 = 4");

    let skipped: Vec<(usize, usize)> = data.skipped.iter().map(|s| (s.row, s.row_id)).collect();
    assert_eq!(
        skipped,
        vec![(2, 1), (3, 2), (4, 3), (5, 4), (8, 6), (9, 7), (10, 8)]
    );
    let reasons: Vec<&SkipReason> = data.skipped.iter().map(|s| &s.reason).collect();
    assert_eq!(reasons[0], &SkipReason::NoAnswerMarker);
    assert_eq!(reasons[1], &SkipReason::MissingField("answer"));
    assert_eq!(reasons[2], &SkipReason::NonNumericAnswer("five".into()));
    assert!(matches!(reasons[3], SkipReason::InvalidJson(_)));
    assert_eq!(
        reasons[4],
        &SkipReason::NotText {
            field: "question",
            found: "a number".into()
        }
    );
    assert_eq!(reasons[5], &SkipReason::NoSolutionSteps);
    assert_eq!(reasons[6], &SkipReason::NotAnObject);

    let summary = data.skipped_summary().to_string();
    assert!(
        summary.starts_with("7 malformed GSM8K row(s) skipped:"),
        "{summary}"
    );
    assert!(
        summary.contains(
            "test.jsonl row 2 (test row id 1): field `answer` has no `#### <number>` line"
        ),
        "{summary}"
    );
    assert!(summary.contains("row 3 (test row id 2): missing field `answer`"));
    assert!(!summary.contains("more"));
}

#[test]
fn summary_lists_first_twenty_and_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    let text: String = (0..25)
        .map(|i| row(&format!("Q{i}?"), "no marker") + "\n")
        .collect();
    std::fs::write(&path, text).unwrap();
    let data = read_gsm8k(&path).unwrap();
    assert!(data.rows.is_empty());
    assert_eq!(data.skipped.len(), 25);
    let summary = data.skipped_summary().to_string();
    assert!(summary.starts_with("25 malformed GSM8K row(s) skipped:"));
    assert!(summary.contains("row 20 (train row id 19)"));
    assert!(!summary.contains("row 21 (train row id 20)"));
    assert!(summary.ends_with(" and 5 more (25 in all)"), "{summary}");
    assert_eq!(summary.lines().count(), 21);
}

/// Writes a GSM8K-schema parquet file (`answer` optional, so a null can be written).
fn write_parquet(path: &Path, rows: &[(&str, Option<&str>)]) {
    let schema = Arc::new(
        parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY question (UTF8); OPTIONAL BYTE_ARRAY answer (UTF8); }",
        )
        .unwrap(),
    );
    let file = File::create(path).unwrap();
    let mut writer =
        SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
            .unwrap();
    let mut group = writer.next_row_group().unwrap();
    let questions: Vec<ByteArray> = rows.iter().map(|(q, _)| ByteArray::from(*q)).collect();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&questions, None, None)
        .unwrap();
    col.close().unwrap();
    let answers: Vec<ByteArray> = rows
        .iter()
        .filter_map(|(_, a)| a.map(ByteArray::from))
        .collect();
    let defs: Vec<i16> = rows.iter().map(|(_, a)| i16::from(a.is_some())).collect();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&answers, Some(&defs), None)
        .unwrap();
    col.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
}

fn write_hf_layout(main: &Path) {
    std::fs::create_dir_all(main).unwrap();
    write_parquet(
        &main.join("train-00000-of-00002.parquet"),
        &[
            (
                "Ann has 3 pens and buys 2 more. How many pens?",
                Some("3 + 2 = <<3+2=5>>5\n#### 5"),
            ),
            ("Broken row?", None),
        ],
    );
    write_parquet(
        &main.join("train-00001-of-00002.parquet"),
        &[(
            "Sam has 9 cards and loses 4. How many cards?",
            Some("9 - 4 = 5\n#### 5"),
        )],
    );
    write_parquet(
        &main.join("test-00000-of-00001.parquet"),
        &[
            ("What is 6 * 7?", Some("6 * 7 = <<6*7=42>>42\n#### 42")),
            ("What is half of 5?", Some("5 / 2 = 2.5\n#### 2.5")),
        ],
    );
}

#[test]
fn parquet_files_in_the_hf_layout() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_layout(&dir.path().join("main"));
    for p in std::fs::read_dir(dir.path().join("main")).unwrap() {
        assert!(p.unwrap().metadata().unwrap().len() < 20_000);
    }
    let data = read_gsm8k(dir.path()).unwrap();
    assert_eq!(data.splits(), vec!["test".to_string(), "train".to_string()]);
    let keys: Vec<(&str, usize, String)> = data
        .rows
        .iter()
        .map(|r| (r.split.as_str(), r.row_id, r.final_answer.to_string()))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("test", 0, "42".to_string()),
            ("test", 1, "2.5".to_string()),
            ("train", 0, "5".to_string()),
            // Row ids run on across the files of a split; id 1 is the malformed row.
            ("train", 2, "5".to_string()),
        ]
    );
    assert_eq!(data.rows[0].solution, "6 * 7 = 42");
    assert_eq!(data.skipped.len(), 1);
    let s = &data.skipped[0];
    assert_eq!((s.split.as_str(), s.row, s.row_id), ("train", 2, 1));
    assert_eq!(s.reason, SkipReason::MissingField("answer"));
    assert!(s.file.ends_with("main/train-00000-of-00002.parquet"));
    assert_eq!(data.split_rows("train").count(), 2);

    // The same directory given as `main/`, and one file alone.
    assert_eq!(read_gsm8k(&dir.path().join("main")).unwrap(), data);
    let one = read_gsm8k(&dir.path().join("main/test-00000-of-00001.parquet")).unwrap();
    assert_eq!(one.rows, data.rows[..2].to_vec());
}

#[test]
fn hf_hub_cache_layout() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("datasets--openai--gsm8k");
    write_hf_layout(&repo.join("snapshots/0123abcd/main"));
    std::fs::create_dir_all(repo.join("snapshots/ffff0000")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
    let data = read_gsm8k(&repo).unwrap();
    assert_eq!(data.rows.len(), 4);
    // A directory without data files is an error naming it.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = read_gsm8k(&empty).unwrap_err().to_string();
    assert!(
        err.contains("empty") && err.contains("main/train-*.parquet"),
        "{err}"
    );
    // So is a file that is not parquet.
    let bad = dir.path().join("train.parquet");
    std::fs::write(&bad, b"not parquet").unwrap();
    let err = read_gsm8k(&bad).unwrap_err().to_string();
    assert!(
        err.contains("train.parquet") && err.contains("Parquet"),
        "{err}"
    );
}
