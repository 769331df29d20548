#!/usr/bin/env python3
"""Baseline for `examples/dpo.rs` on the GPU: TRL 1.16 `DPOTrainer` with PEFT LoRA on a local
gpt-oss checkpoint (e.g. `make_checkpoint --arch 20b --out /dev/shm/g20`), loaded as the seed
recipe does (Mxfp4Config(dequantize=True) → bf16 experts, eager attention, gradient
checkpointing), LoRA r 8 / alpha 16 on all-linear (the attention q/k/v/o_proj) plus the experts of
layers 7, 15 and 23 (cookbook `target_parameters`), sigmoid loss, beta 0.1, batch 1, GA 1.
Each pair is a prompt and chosen / rejected completions of `--tokens` random token ids
(default 1,024 each, cut to max_length 2,048 as ours), so no tokenizer files are needed.
Prints the median step time after `--warmup` steps and torch.cuda.max_memory_allocated in GiB.

    PYTHONPATH=/tmp/site:benches/shim python3 benches/baseline_trl_dpo.py --model /dev/shm/g20 \
        [--steps 6] [--warmup 2] [--tokens 1024] [--max-length 2048]

benches/shim holds stand-ins for `datasets` (a list-backed Dataset), `pandas` and `pyarrow`, which
TRL imports but a DPO run on an in-memory dataset does not use (their wheels do not fit the device
copy limit). Needs torch, transformers >= 5, accelerate, trl 1.16, peft 0.21.
"""

import argparse
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Mxfp4Config, PreTrainedTokenizerFast, TrainerCallback

import datasets
import peft
import trl
from peft import LoraConfig

GIB = float(1 << 30)
PAD, EOS = 199999, 200002


def tokenizer():
    """A word-level tokenizer that knows only pad and eos: the rows are already token ids."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": PAD, "<|return|>": EOS},
                                     unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                   eos_token="<|return|>")


class PreTokenized(trl.DPOTrainer):
    """The rows carry `prompt_ids` / `chosen_ids` / `rejected_ids` already."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class StepTimes(TrainerCallback):
    def __init__(self, warmup):
        self.times, self.last, self.warmup = [], None, warmup

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.last)
        if len(self.times) == self.warmup:
            torch.cuda.reset_peak_memory_stats()


def rows(n, tokens, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda: torch.randint(0, vocab - 1000, (tokens,), generator=g).tolist()
    return [{"prompt_ids": ids(), "chosen_ids": ids() + [EOS], "rejected_ids": ids() + [EOS]}
            for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--out", default="/tmp/trl_dpo_out")
    a = ap.parse_args()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        a.model, dtype=torch.bfloat16, attn_implementation="eager", device_map="cuda",
        quantization_config=Mxfp4Config(dequantize=True), use_cache=False,
    )
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"peft {peft.__version__}; loaded in {time.perf_counter() - t:.1f} s")
    layers = model.config.num_hidden_layers
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules="all-linear",
        target_parameters=[f"{l}.mlp.experts.{p}" for l in (7, 15, 23) if l < layers
                           for p in ("gate_up_proj", "down_proj")],
    )
    args = trl.DPOConfig(
        output_dir=a.out, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps, learning_rate=1e-6, lr_scheduler_type="linear", beta=0.1,
        loss_type=["sigmoid"], max_length=a.max_length, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=True, logging_steps=1,
        save_strategy="no", report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, seed=0,
    )
    data = datasets.Dataset.from_list(rows(a.warmup + a.steps, a.tokens, model.config.vocab_size, 0))
    timer = StepTimes(a.warmup)
    trainer = PreTokenized(model=model, args=args, train_dataset=data, processing_class=tokenizer(),
                           peft_config=lora, callbacks=[timer])
    trainer.model.print_trainable_parameters()
    trainer.train()
    steady = timer.times[a.warmup:]
    print(f"device {torch.cuda.get_device_name()}")
    print(f"TRL DPO steady-state step: {statistics.median(steady):.4f} s (median of {len(steady)} "
          f"steps after {a.warmup}; prompt {a.tokens} + completions {a.tokens}+1 tokens, max_length "
          f"{a.max_length}, batch 1)")
    print(f"TRL DPO peak device memory: {torch.cuda.max_memory_allocated() / GIB:.2f} GiB allocated "
          f"(after warm-up), {torch.cuda.max_memory_reserved() / GIB:.2f} GiB reserved")


if __name__ == "__main__":
    main()
