//! Schedules vs transformers' `get_scheduler` (fixture: scripts/fixtures/sft/make_schedule_fixture.py).

use gptoss_sft::schedule::{LrSchedule, MinLr, SchedulerType, Warmup};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    learning_rate: f64,
    warmup: f64,
    total_steps: u64,
    kwargs: std::collections::BTreeMap<String, f64>,
    warmup_steps: u64,
    lrs: Vec<f64>,
}

#[test]
fn schedules_match_transformers_exactly() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/schedules.json"
    ))
    .unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let kind: SchedulerType = c.kind.parse().unwrap();
        let min_lr = match (c.kwargs.get("min_lr_rate"), c.kwargs.get("min_lr")) {
            (Some(r), None) => Some(MinLr::Rate(*r)),
            (None, Some(m)) => Some(MinLr::Absolute(*m)),
            _ => None,
        };
        let s = LrSchedule::new(
            kind,
            c.learning_rate,
            Warmup::from_f64(c.warmup).unwrap(),
            c.total_steps,
            min_lr,
        )
        .unwrap();
        assert_eq!(s.warmup_steps(), c.warmup_steps, "{}: warmup", c.name);
        for (k, want) in c.lrs.iter().enumerate() {
            let got = s.lr(k as u64);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{}: lr({k}) {got} vs {want}",
                c.name
            );
            // The Trainer logs the lr of update N at global step N (1-based).
            assert_eq!(s.logged_lr(k as u64 + 1), *want, "{}: logged", c.name);
        }
    }
}
