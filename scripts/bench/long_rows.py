#!/usr/bin/env python3
"""Writes a Multilingual-Thinking-schema JSONL whose rows are longer than max_length, so every
training row of `finetune_multilingual --max-length N` is truncated to exactly N tokens: what the
GPU benchmarks of the real-checkpoint path train on (docs/performance.md). Seeded, stdlib only.

    python3 scripts/bench/long_rows.py OUT.jsonl [--rows 64] [--words 2500] [--seed 0]
"""
import argparse
import json
import random

WORDS = ("the of and to in is that it for as with was on be by this are or at from have an "
         "not which but all were one we there can more if has been their so will about would "
         "number first then each other many time some these two may like into could people "
         "water after way over made just only through where most much before line right too "
         "means old any same tell boy follow came want show also around form three small set "
         "put end does another well large must big even such because turn here why ask went "
         "men read need land different home us move try kind hand picture again change off "
         "play spell air away animal house point page letter mother answer found study still "
         "learn should world high every near add food between own below country plant last").split()
LANGS = ["English", "French", "German", "Spanish", "Italian", "Portuguese"]


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--words", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with open(a.out, "w") as f:
        for i in range(a.rows):
            lang = LANGS[i % len(LANGS)]
            user = text(rng, 40)
            analysis = text(rng, a.words)
            final = text(rng, 60)
            row = {
                "reasoning_language": lang,
                "developer": "You are a helpful assistant.",
                "user": user,
                "analysis": analysis,
                "final": final,
                "messages": [
                    {"role": "system", "content": f"reasoning language: {lang}\n\nYou are a helpful assistant.",
                     "thinking": None},
                    {"role": "user", "content": user, "thinking": None},
                    {"role": "assistant", "content": final, "thinking": analysis},
                ],
            }
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
