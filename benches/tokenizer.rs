//! Encode throughput of our o200k_harmony tokenizer vs tiktoken-rs's o200k_base (MB/s) on a
//! multilingual corpus. `cargo bench --bench tokenizer`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gptoss::harmony::HarmonyTokenizer;

const SAMPLES: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. Training a mixture-of-experts model needs care.\n",
    "Bonjour ! Peux-tu m'expliquer la photosynthèse ? La lumière devient de l'énergie chimique.\n",
    "¿Cuál es la capital de Perú? La capital es Lima, una ciudad costera.\n",
    "Wie funktioniert ein Kühlschrank? Er pumpt Wärme über ein Kältemittel nach außen.\n",
    "Qual è la ricetta della carbonara? Guanciale, uova, pecorino e pepe nero.\n",
    "请解释一下量子纠缠。两个粒子的状态相互关联，即使相隔很远。\n",
    "भारत की राजधानी नई दिल्ली है। यह एक बड़ा शहर है।\n",
    "富士山の高さは3,776メートルです。日本で一番高い山です。\n",
    "ما هي عاصمة مصر؟ عاصمة مصر هي القاهرة.\n",
    "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n",
];

fn corpus() -> String {
    let mut s = String::new();
    while s.len() < 1 << 20 {
        for t in SAMPLES {
            s.push_str(t);
        }
    }
    s
}

fn bench(c: &mut Criterion) {
    let text = corpus();
    let ours = match HarmonyTokenizer::o200k_harmony() {
        Ok(t) => t,
        Err(e) => panic!("building o200k_harmony: {e}"),
    };
    let tiktoken = match tiktoken_rs::o200k_base() {
        Ok(t) => t,
        Err(e) => panic!("tiktoken-rs o200k_base: {e}"),
    };
    let mut g = c.benchmark_group("encode_1MiB_multilingual");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(5));
    g.bench_function("gptoss_harmony_encode", |b| {
        b.iter(|| ours.encode(&text).map(|v| v.len()).unwrap_or(0))
    });
    g.bench_function("gptoss_harmony_encode_with_special_tokens", |b| {
        b.iter(|| {
            ours.encode_with_special_tokens(&text)
                .map(|v| v.len())
                .unwrap_or(0)
        })
    });
    g.bench_function("tiktoken_rs_o200k_base_encode_ordinary", |b| {
        b.iter(|| tiktoken.encode_ordinary(&text).len())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
