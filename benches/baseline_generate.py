#!/usr/bin/env python3
"""Baseline for examples/bench_generate.rs: transformers' generate on the gpt-oss-20b shape.

Random bf16 weights initialised from the config on the GPU (experts dense bf16), eager attention,
greedy decoding with a KV cache, no stop token (min_new_tokens = max_new_tokens). Prints per batch
size the prefill time (generate of 1 token) and the decode throughput (generated tokens of all rows per
second beyond the first), in the same table layout as the Rust bench.

    python3 benches/baseline_generate.py [--batch 1,8] [--prompt 128] [--new 64] [--layers N]
    # like `bench_generate --requests 256 --batch 64`: 256 prompts (lengths prompt/2..prompt), generate
    # in left-padded batches of 64 (static batching: transformers' generate), total time
    python3 benches/baseline_generate.py --requests 256 --batch 64 --prompt 128 --new 256
"""

import argparse
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, GptOssConfig


def config_20b(layers):
    c = GptOssConfig(
        num_hidden_layers=24, num_local_experts=32, vocab_size=201088, hidden_size=2880,
        intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        num_experts_per_tok=4, sliding_window=128, rms_norm_eps=1e-5, swiglu_limit=7.0,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096,
                         "rope_theta": 150000.0},
        max_position_embeddings=131072, initializer_range=0.02, tie_word_embeddings=False,
    )
    if layers is not None:
        c.num_hidden_layers = min(layers, 24)
        c.layer_types = c.layer_types[: c.num_hidden_layers]
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    config = config_20b(args.layers)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
    model.eval()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}; "
          f"{config.num_hidden_layers} layers; prompt {args.prompt}, {args.new} new tokens, greedy")
    if args.requests is not None:
        return run_requests(model, args)
    print(f"{'batch':>6} {'prefill_s':>12} {'decode_s/step':>14} {'decode_tokens/s':>16}")
    for b in [int(x) for x in args.batch.split(",")]:
        ids = torch.randint(0, 199000, (b, args.prompt), device="cuda")
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=199999, eos_token_id=None)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **kw)
            torch.cuda.synchronize()
            total = time.perf_counter() - t
        decode = max(total - prefill, 1e-9)
        steps = args.new - 1
        print(f"{b:>6} {prefill:>12.4f} {decode / steps:>14.5f} {b * steps / decode:>16.1f}", flush=True)


def run_requests(model, args):
    b = int(args.batch.split(",")[0])
    lo = max(args.prompt // 2, 1)
    gen = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(lo, args.prompt + 1, (args.requests,), generator=gen).tolist()
    prompts = [torch.randint(0, 199000, (n,), generator=gen) for n in lens]
    kw = dict(do_sample=False, pad_token_id=199999, eos_token_id=None,
              max_new_tokens=args.new, min_new_tokens=args.new)
    with torch.no_grad():
        torch.cuda.synchronize()
        t = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), b):
            chunk = prompts[i:i + b]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), 199999, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):  # left padding, as for decoder-only generation
                ids[r, width - len(p):] = p
                mask[r, width - len(p):] = 1
            out = model.generate(ids.cuda(), attention_mask=mask.cuda(), **kw)
            generated += (out.shape[1] - width) * len(chunk)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t
    print(f"transformers generate: {args.requests} requests (prompts {lo}..={args.prompt} tokens), "
          f"{args.new} new each, batch {b}: {secs:.2f} s total, {generated / secs:.1f} generated tokens/s",
          flush=True)


if __name__ == "__main__":
    main()
