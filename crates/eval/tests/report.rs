//! The report writers: eval.json round-trips, eval.md has the expected rows, the PNG decodes.

use gptoss_eval::report::{
    read_eval_json, render_markdown, write_report, EVAL_JSON, EVAL_MD, LANGUAGE_CHART,
};
use gptoss_eval::{default_detector, evaluate, Completion, Language, ModelEval, RowRecord};
use gptoss_harmony::ids;

fn model(label: &str, german_ok: usize) -> ModelEval {
    let de = "Der Nutzer fragt nach der Summe von 23 und 12. 23 + 12 = 35, das passt.";
    let en = "The user asks for the sum of 23 and 12. 23 + 12 = 35, which checks out.";
    let fr = "L'utilisateur demande la somme de 23 et 12. 23 + 12 = 35, c'est cohérent.";
    let mut recs = Vec::new();
    for i in 0..4 {
        let analysis = if i < german_ok { de } else { en };
        recs.push(
            RowRecord::new(
                i,
                Completion::from_channels(Some(analysis), Some("35"), Some(ids::RETURN)),
            )
            .with_requested_language(Some(Language::German))
            .with_reference(Some("#### 35")),
        );
    }
    recs.push(
        RowRecord::new(
            4,
            Completion::from_channels(Some(fr), Some("36"), Some(ids::RETURN)),
        )
        .with_requested_language(Some(Language::French))
        .with_reference(Some("#### 35")),
    );
    // A row without language or reference, with a pipe and a newline in its text.
    recs.push(RowRecord::new(
        5,
        Completion::from_channels(None, Some("a | b\nc"), None),
    ));
    evaluate(label, recs, default_detector())
}

/// Structural equality with floats compared to 1e-12 relative.
fn assert_close(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                "{at}: {x} vs {y}"
            );
        }
        (Array(x), Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: array lengths");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert_close(x, y, &format!("{at}[{i}]"));
            }
        }
        (Object(x), Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{at}: keys"
            );
            for (k, v) in x {
                assert_close(v, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

#[test]
fn writes_json_markdown_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested").join("eval");
    let models = vec![model("base", 1), model("adapter | r8", 4)];
    let files = write_report(&out, &models).unwrap();
    assert_eq!(files.json, out.join(EVAL_JSON));
    assert_eq!(files.markdown, out.join(EVAL_MD));
    assert_eq!(files.chart, out.join(LANGUAGE_CHART));
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // eval.json round-trips, generated text included: equal up to the last bit of floats
    // (serde_json's default float parser may be 1 ULP off the shortest printed form).
    let back = read_eval_json(&files.json).unwrap();
    assert_eq!(back.models.len(), models.len());
    assert_close(
        &serde_json::to_value(&back.models).unwrap(),
        &serde_json::to_value(&models).unwrap(),
        "models",
    );
    assert_eq!(back.models[1].rows, models[1].rows);
    let text = std::fs::read_to_string(&files.json).unwrap();
    assert!(text.contains("\"format\": \"gptoss-eval/1\""));
    assert!(text.contains("Der Nutzer fragt nach der Summe"));
    assert!(text.contains("<|channel|>analysis<|message|>"));

    // eval.md: side-by-side columns, overall rows, per-language rows, skipped counts.
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    assert_eq!(
        md,
        render_markdown(&models.iter().map(ModelEval::labeled).collect::<Vec<_>>())
    );
    for line in [
        "| metric | base | adapter \\| r8 |",
        "| reasoning language | 40.0 % (2/5; 95 % CI 11.8–76.9 %) | 100.0 % (5/5; 95 % CI 56.6–100.0 %) |",
        "| answer accuracy | 80.0 % (4/5; 95 % CI 37.6–96.4 %) | 80.0 % (4/5; 95 % CI 37.6–96.4 %) |",
        "| format valid | 83.3 % (5/6; 95 % CI 43.6–97.0 %) | 83.3 % (5/6; 95 % CI 43.6–97.0 %) |",
        "| final-channel language | – (0 rows) | – (0 rows) |",
        "| skipped: no requested language | 1 | 1 |",
        "| skipped: no reference answer | 1 | 1 |",
        "| German | 25.0 % (1/4; 95 % CI 4.6–69.9 %) | 100.0 % (4/4; 95 % CI 51.0–100.0 %) |",
        "| French | 100.0 % (1/1; 95 % CI 20.7–100.0 %) | 100.0 % (1/1; 95 % CI 20.7–100.0 %) |",
        "| German | English 3, German 1 | German 4 |",
    ] {
        assert!(md.lines().any(|l| l == line), "missing line {line:?} in:\n{md}");
    }

    // The PNG: signature, IHDR size, decodes, and is not blank (bars in several colours).
    let bytes = std::fs::read(&files.chart).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!(
        (w, h),
        (
            gptoss_eval::chart::chart_width(2, 2),
            gptoss_eval::chart::CHART_HEIGHT
        )
    );
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (w, h));
    let mut colours = std::collections::HashSet::new();
    let mut non_white = 0usize;
    for p in img.pixels() {
        if p.0 != [255, 255, 255] {
            non_white += 1;
        }
        colours.insert(p.0);
    }
    assert!(
        non_white > (w * h / 50) as usize,
        "only {non_white} non-white pixels"
    );
    // Both palette colours (base, adapter) appear: bars were drawn.
    assert!(colours.contains(&[31, 119, 180]) && colours.contains(&[255, 127, 14]));
    // Anti-aliased text gives many grey levels; without a font there would be none.
    let greys = colours
        .iter()
        .filter(|c| c[0] == c[1] && c[1] == c[2] && c[0] > 0 && c[0] < 255)
        .count();
    assert!(greys > 20, "{greys} grey levels: no text drawn?");
}

#[test]
fn chart_without_languages_and_bad_json() {
    let dir = tempfile::tempdir().unwrap();
    let e = evaluate(
        "none",
        vec![RowRecord::new(
            0,
            Completion::from_channels(None, Some("1"), None),
        )],
        default_detector(),
    );
    let files = write_report(dir.path(), &[e]).unwrap();
    assert!(image::open(&files.chart).is_ok());

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"format\": \"gptoss-eval/1\", \"models\": [1]}").unwrap();
    let err = read_eval_json(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.json") && err.contains("line"), "{err}");
    std::fs::write(&bad, "{\"format\": \"other\", \"models\": []}").unwrap();
    let err = read_eval_json(&bad).unwrap_err().to_string();
    assert!(
        err.contains("format") && err.contains("gptoss-eval/1"),
        "{err}"
    );
    let err = read_eval_json(&dir.path().join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.json"), "{err}");
}
