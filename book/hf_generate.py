#!/usr/bin/env python3
"""Times Hugging Face `transformers`' `generate` on a GPT-2 `model.safetensors`: the
PyTorch side of chapter 8's speed table (book/gpt2_speed.py runs it).

    python book/hf_generate.py --weights DIR/model.safetensors [--tokens 100] [--no-cache]

Loads the file into `GPT2LMHeadModel` (GPT-2 124M's config; the head tied to `wte`, as in the
published file), generates 2 untimed tokens, then TOKENS timed ones from the same 3-token
prompt as `ch08_pretrained --bench` ("ROMEO:" is 33676, 4720, 25), sampling at temperature
0.8 as the course does, with the cache on (default) or off. Prints one JSON line.
"""
import argparse
import json
import time

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

PROMPT = [33676, 4720, 25]  # "ROMEO:" in GPT-2's tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1337)
    start = time.time()
    model = GPT2LMHeadModel(GPT2Config()).eval()
    missing, unexpected = model.transformer.load_state_dict(load_file(a.weights), strict=False)
    if missing or [k for k in unexpected if not k.endswith("attn.bias")]:
        raise SystemExit(f"{a.weights}: missing {missing}, unexpected {unexpected}")
    load = time.time() - start
    ids = torch.tensor([PROMPT])

    def generate(n):
        start = time.time()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                       temperature=0.8, top_k=0, use_cache=not a.no_cache, pad_token_id=0)
        return time.time() - start

    with torch.no_grad():
        warmup = generate(2)
        seconds = generate(a.tokens)
    print(json.dumps({"torch": torch.__version__, "cached": not a.no_cache,
                      "new_tokens": a.tokens, "load_seconds": load, "warmup_seconds": warmup,
                      "tokens_per_second": a.tokens / seconds}))


if __name__ == "__main__":
    main()
