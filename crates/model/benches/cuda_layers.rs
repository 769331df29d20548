//! GPU throughput of gpt-oss-20b-shaped decoder layers (bf16): forward, and forward + backward to a LoRA-like
//! adapter on q_proj and the experts. Needs `--features cuda` and a GPU:
//! `cargo bench -p gptoss-model --features cuda --bench cuda_layers`.

#[cfg(feature = "cuda")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::Arc;
    use std::time::Instant;

    use candle_core::{DType, Device, Tensor, Var};
    use gptoss_model::{init_random, Config, ExpertAdapter, ExpertParam, LinearAdapter};

    #[derive(Debug)]
    struct Lin(Var, Var);
    impl LinearAdapter for Lin {
        fn forward(&self, x: &Tensor, base: &Tensor) -> candle_core::Result<Tensor> {
            let d = x
                .to_dtype(DType::F32)?
                .broadcast_matmul(&self.0.t()?)?
                .broadcast_matmul(&self.1.t()?)?;
            base + d.to_dtype(base.dtype())?
        }
    }
    #[derive(Debug)]
    struct Exp(Var, Var);
    impl ExpertAdapter for Exp {
        fn delta(&self, e: usize, x: &Tensor) -> candle_core::Result<Tensor> {
            x.to_dtype(DType::F32)?
                .matmul(&self.0.get(e)?)?
                .matmul(&self.1.get(e)?)?
                .to_dtype(x.dtype())
        }
    }

    let dev = Device::new_cuda(0)?;
    let layers: usize = std::env::var("LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut cfg = Config::gpt_oss_20b();
    cfg.num_hidden_layers = layers;
    cfg.layer_types = None;
    cfg.quantization_config = None;
    let mut model = init_random(&cfg, DType::BF16, &dev, Some(0))?;
    let (h, e, i) = (
        cfg.hidden_size,
        cfg.num_local_experts,
        cfg.intermediate_size,
    );
    let v = |shape: &[usize]| Var::from_tensor(&(Tensor::randn(0f32, 0.01, shape, &dev)?));
    let q = Arc::new(Lin(v(&[8, h])?, v(&[4096, 8])?));
    let gu = Arc::new(Exp(v(&[e, h, 8])?, v(&[e, 8, 2 * i])?));
    if let Some((_, l)) = model.named_linears_mut().into_iter().next() {
        l.set_adapter(Some(q.clone()));
    }
    for (_, x) in model.named_experts_mut() {
        x.set_adapter(ExpertParam::GateUp, Some(gu.clone()));
    }
    for (b, t) in [(1usize, 2048usize), (4, 1024)] {
        let ids: Vec<u32> = (0..b * t).map(|k| (k * 7919 % 200000) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let ctx = model.attention_context(b, t, 0, None)?;
        let run = |backward: bool| -> Result<f64, Box<dyn std::error::Error>> {
            let start = Instant::now();
            let mut hs = model.embed(&ids)?;
            for li in 0..layers {
                hs = model.layer_forward(li, &hs, &ctx)?.hidden;
            }
            let s = hs.to_dtype(DType::F32)?.sqr()?.mean_all()?;
            if backward {
                let g = s.backward()?;
                let _ = g.get(q.0.as_tensor());
            }
            let _ = s.to_scalar::<f32>()?;
            dev.synchronize()?;
            Ok(start.elapsed().as_secs_f64())
        };
        {
            // forward split by block (layer 0): attention vs MoE
            use candle_core::Module;
            let layer = &model.model.layers[0];
            let hs = model.embed(&ids)?;
            let xn = layer.input_layernorm.forward(&hs)?;
            let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Result<f64, Box<dyn std::error::Error>> {
                f()?;
                dev.synchronize()?;
                let start = Instant::now();
                for _ in 0..5 {
                    f()?;
                }
                dev.synchronize()?;
                Ok(start.elapsed().as_secs_f64() / 5.0 * 1e3)
            };
            let attn = time(&|| layer.self_attn.forward(&xn, &ctx, None))?;
            let moe = time(&|| layer.mlp.forward(&xn).map(|(y, _)| y))?;
            let flat = xn.reshape((b * t, h))?;
            let route = time(&|| layer.mlp.router.route(&flat).map(|r| r.weights))?;
            println!("  B={b} T={t} layer 0 forward: attention {attn:.1} ms, MoE {moe:.1} ms (router alone {route:.1} ms)");
        }
        for backward in [false, true] {
            run(backward)?;
            let n = 5;
            let mut tot = 0.0;
            for _ in 0..n {
                tot += run(backward)?;
            }
            let per = tot / n as f64;
            println!(
                "20b-shaped, {layers} layers, bf16, B={b} T={t}, {}: {:.1} ms/iter, {:.0} tokens/s, {:.1} ms/layer",
                if backward { "forward+backward" } else { "forward" },
                per * 1e3,
                (b * t) as f64 / per,
                per * 1e3 / layers as f64
            );
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("cuda_layers: build with --features cuda to run this benchmark");
}
