#!/usr/bin/env python3
"""Writes a TRL-schema preference JSONL (plain text `prompt`, `chosen`, `rejected`) of long rows
for the DPO GPU measurement (docs/dpo.md): each field is `--words` words of a list whose words are
one o200k token each with their leading space, so each field is about `--words` tokens (prompt
1,024 + completion 1,024 + `<|return|>` → 2,049 tokens, cut to `--max-length 2048` by both
trainers). benches/baseline_trl_dpo.py trains on random ids of the same lengths. Seeded, stdlib only.

    python3 scripts/bench/long_prefs.py OUT.jsonl [--rows 16] [--words 1024] [--seed 0]
"""
import argparse
import json
import random

WORDS = ("the of and to in is that it for as with was on be by this are or at from have an "
         "not which but all were one we there can more if has been their so will about would "
         "number first then each other many time some these two may like into could people "
         "water after way over made just only through where most much before line right too").split()


def text(rng, n):
    return "".join(" " + rng.choice(WORDS) for _ in range(n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--words", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with open(a.out, "w") as f:
        for _ in range(a.rows):
            row = {"prompt": text(rng, a.words), "chosen": text(rng, a.words),
                   "rejected": text(rng, a.words)}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
