//! YaRN parameters of gpt-oss-20b against the values transformers 5.24 computes (reference §2).
#![allow(clippy::excessive_precision)] // the values are printed by transformers as they are

use gptoss_model::{Config, RopeParams};

#[test]
fn gpt_oss_20b_inv_freq_and_attention_factor() {
    let want: [f32; 32] = [
        1.0,
        0.689044297,
        0.47478205,
        0.327145875,
        0.225418001,
        0.155322984,
        0.107024424,
        0.0737445652,
        0.0508132726,
        0.0317056961,
        0.0193349998,
        0.0115920492,
        0.00679495931,
        0.00386035908,
        0.00209379266,
        0.00105260219,
        0.000456483918,
        0.000129318694,
        3.83088118e-05,
        2.63964685e-05,
        1.8188337e-05,
        1.25325696e-05,
        8.63549576e-06,
        5.95023948e-06,
        4.09997847e-06,
        2.82506676e-06,
        1.94659629e-06,
        1.34129095e-06,
        9.24208962e-07,
        6.36820914e-07,
        4.38797855e-07,
        3.0235114e-07,
    ];
    let p = RopeParams::new(&Config::gpt_oss_20b());
    assert_eq!(p.inv_freq.len(), 32);
    for (i, (g, w)) in p.inv_freq.iter().zip(want).enumerate() {
        assert!(
            ((g - w) / w).abs() < 2e-7,
            "inv_freq[{i}] = {g}, transformers {w}"
        );
    }
    assert!((p.attention_factor - 1.3465735902799727).abs() < 1e-15);
}
