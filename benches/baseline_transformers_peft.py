#!/usr/bin/env python3
"""Baseline for examples/bench_train_step.rs: the same LoRA training step with transformers + PEFT.

gpt-oss-20b architecture randomly initialised from its config directly on the GPU (bf16, experts
dense bf16 — transformers' training path dequantizes MXFP4 checkpoints to bf16), eager attention,
the cookbook LoRA (r 8, alpha 16, all-linear + experts of layers 7/15/23), torch AdamW (lr 2e-4),
clip_grad_norm_(1.0), batch 1 of random tokens, labels = input_ids, gradient checkpointing on/off.
Prints per configuration the median step time, tokens/s and torch.cuda.max_memory_allocated
(and max_memory_reserved), in the same table layout as the Rust bench.

    python3 benches/baseline_transformers_peft.py [--seq 1024,2048] [--steps 5] [--warmup 1]
        [--gc both|on|off] [--layers N] [--experts-implementation eager|grouped_mm|...] [--tiny --cpu]
        [--model DIR]   # a checkpoint (make_checkpoint's), MXFP4 experts dequantized at load

Needs torch, transformers >= 5 and peft 0.21 (measured with torch 2.11, transformers 5.17, peft 0.21.2).
"""

import argparse
import statistics
import time

import torch
import transformers
import peft
from transformers import AutoModelForCausalLM, GptOssConfig
from peft import LoraConfig, get_peft_model

GIB = float(1 << 30)


def load(args, device):
    """A checkpoint directory (e.g. make_checkpoint's) as the seed recipe loads it: MXFP4 experts
    dequantized to bf16 (Mxfp4Config(dequantize=True)), eager attention."""
    from transformers import Mxfp4Config
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation="eager", device_map=device.type,
        quantization_config=Mxfp4Config(dequantize=True), use_cache=False,
    )
    return model, model.config


def build(args, device):
    if args.model:
        model, config = load(args, device)
    elif args.tiny:
        config = GptOssConfig(
            vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=8,
        )
    else:
        # openai/gpt-oss-20b's config.json (GptOssConfig()'s own defaults are the 120b shape).
        config = GptOssConfig(
            num_hidden_layers=24, num_local_experts=32, vocab_size=201088, hidden_size=2880,
            intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
            num_experts_per_tok=4, sliding_window=128, rms_norm_eps=1e-5, swiglu_limit=7.0,
            rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096,
                             "rope_theta": 150000.0},
            max_position_embeddings=131072, initializer_range=0.02, tie_word_embeddings=False,
            router_aux_loss_coef=0.9, output_router_logits=False,
        )
    if not args.model:
        if args.layers is not None:
            config.num_hidden_layers = min(args.layers, config.num_hidden_layers)
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        config.use_cache = False
        dtype = torch.float32 if args.cpu else torch.bfloat16
        kwargs = dict(dtype=dtype, attn_implementation="eager")
        if args.experts_implementation:
            kwargs["experts_implementation"] = args.experts_implementation
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.config.use_cache = False
    layers = config.num_hidden_layers
    target_parameters = [
        f"{l}.mlp.experts.{p}" for l in (7, 15, 23) if l < layers for p in ("gate_up_proj", "down_proj")
    ]
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear",
        target_parameters=target_parameters or None,
    )
    model = get_peft_model(model, lora)
    return model, config


def step(model, opt, seq, vocab, device, gc):
    ids = torch.randint(0, vocab, (1, seq), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out.loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="1024,2048")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gc", default="both", choices=["both", "on", "off"])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--experts-implementation", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model", default=None, help="a checkpoint directory instead of random weights")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    t = time.perf_counter()
    model, config = build(args, device)
    impl = getattr(model.base_model.model.config, "_experts_implementation", None)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{config.num_hidden_layers} layers, experts_implementation={impl}; built in "
        f"{time.perf_counter() - t:.1f} s"
    )
    model.print_trainable_parameters()
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name()}; weights+adapters allocated "
              f"{torch.cuda.memory_allocated() / GIB:.2f} GiB")
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.gc]
    print(f"{'seq':>6} {'gc':>4} {'median_s':>10} {'tokens/s':>10} {'peak_alloc':>12} {'peak_resv':>12} {'loss':>8}")
    for gc in modes:
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()
        model.train()
        for seq in [int(s) for s in args.seq.split(",")]:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times, loss, failed = [], float("nan"), None
            for i in range(args.warmup + args.steps):
                try:
                    dt, loss = step(model, opt, seq, config.vocab_size, device, gc)
                except torch.OutOfMemoryError as e:  # report and go on with the next configuration
                    failed = str(e).split("\n")[0][:160]
                    opt.zero_grad(set_to_none=True)
                    break
                print(f"  seq {seq} gc {gc} step {i}: {dt:.3f} s loss {loss:.4f}", flush=True)
                if i >= args.warmup:
                    times.append(dt)
            peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else 0.0
            resv = torch.cuda.max_memory_reserved() / GIB if device.type == "cuda" else 0.0
            g = "on" if gc else "off"
            if failed:
                print(f"{seq:>6} {g:>4} FAILED ({failed}); peak_alloc {peak:.2f} GiB", flush=True)
                continue
            m = statistics.median(times)
            print(f"{seq:>6} {g:>4} {m:>10.4f} {seq / m:>10.0f} {peak:>8.2f} GiB {resv:>8.2f} GiB {loss:>8.4f}",
                  flush=True)
            del opt


if __name__ == "__main__":
    main()
