#!/usr/bin/env python3
"""Instruction tuning's training step at GPT-2 124M's size, side by side: the course
(`ch09_finetune --part speed`, chapter 5's fused kernels) and PyTorch with `transformers`'
`GPT2LMHeadModel`, on the same batch.

The course's binary picks the batch (the first 8 training records of instruction-data.json in
GPT-2's tokens, padded with <|endoftext|>, prompt and padding masked as LLMs-from-scratch does)
and writes it to speed_batch.json; PyTorch then trains on that file, twice: as
LLMs-from-scratch does (logits at every position, the masked ones ignored by the loss) and with
only the positions that count sent through the output head, as the course does. Both start from random
weights of GPT-2 124M's shape (they cost what GPT-2's do), use AdamW (weight decay 0.1) and
clip the gradient norm at 1, and time `--steps` steps after one untimed step. The programs run
in turns, ROUNDS times, each time in a fresh process, and the table shows each program's median
run with its peak resident memory (/usr/bin/time).

    book/instruct_speed.py --torch-python ~/torchvenv/bin/python [--rounds 3] [--steps 3]
                           [--backends flex]

Needs GPT_INSTRUCTIONS (or the download in data/). Writes
book/src/recorded/speed/gpt2-instruct.md (and .json, the raw runs); `--render` writes the
table again from the JSON file without running anything. The PyTorch side alone:

    PY book/instruct_speed.py --torch-worker BATCH.json --steps 3
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))
OUT = os.path.join(ROOT, "book", "src", "recorded", "speed")


def torch_worker(batch_file, steps, threads, select):
    """Trains a random GPT-2 124M on the batch in batch_file; prints one JSON line. With
    `select`, only the positions that count go through the output head, as the course does."""
    import time

    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # 124M, no dropout
    model = GPT2LMHeadModel(config).train()
    with open(batch_file) as f:
        batch = json.load(f)
    inputs = torch.tensor(batch["inputs"])  # [b, t]
    targets = torch.tensor(batch["targets"])  # [b, t], -100 where the loss ignores it
    optim = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    step_ms = []
    for step in range(steps + 1):
        tick = time.perf_counter()
        if select:
            hidden = model.transformer(inputs).last_hidden_state  # [b, t, c]
            kept = targets != -100
            logits = model.lm_head(hidden[kept])  # [targets, vocab]
            loss = F.cross_entropy(logits, targets[kept])
        else:
            logits = model(inputs).logits  # [b, t, vocab]
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step > 0:
            step_ms.append((time.perf_counter() - tick) * 1e3)
    median = statistics.median(step_ms)
    b, t = inputs.shape
    print(json.dumps({
        "program": f"PyTorch {torch.__version__}, transformers, {threads} threads"
                   + (", head on the targets only" if select else ""),
        "batch": [b, t], "targets": int((targets != -100).sum()), "step_ms": step_ms,
        "median_ms": median, "tokens_per_second": b * t / (median / 1e3),
        "parameters": sum(p.numel() for p in model.parameters()),
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-python", help="a Python with torch and transformers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="flex")
    ap.add_argument("--torch-worker", metavar="BATCH_JSON")
    ap.add_argument("--select", action="store_true",
                    help="--torch-worker: the output head on the positions that count only")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: write the table again from the JSON file's runs")
    a = ap.parse_args()
    if a.torch_worker:
        return torch_worker(a.torch_worker, a.steps, a.threads, a.select)
    sys.path.insert(0, HERE)
    from gpt2_speed import timed  # book/gpt2_speed.py, beside this file
    from speed import sh

    if a.render:
        with open(os.path.join(OUT, "gpt2-instruct.json")) as f:
            saved = json.load(f)
        return write(saved["command"], saved["cpu"], saved["runs"])
    if not a.torch_python:
        sys.exit("--torch-python PY is needed (a Python with torch and transformers)")
    sh(["cargo", "build", "--release", "--quiet", "--bin", "ch09_finetune"], cwd=ROOT)
    binary = os.path.join(TARGET, "release", "ch09_finetune")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    runs = {}
    batch_file = None
    for r in range(a.rounds):
        for backend in a.backends.split(","):
            out = tempfile.mkdtemp(prefix="instruct-speed-")
            run = timed([binary, "--backend", backend, "--part", "speed", "--speed-steps",
                         str(a.steps), "--out", out], env)
            if "error" not in run:
                batch_file = os.path.join(out, "speed_batch.json")
            label = f"this course, {backend}"
            runs.setdefault(label, []).append(run)
            report(r, label, run)
        if batch_file is None:
            sys.exit("the course's binary wrote no batch; see the errors above")
        for select in [[], ["--select"]]:
            run = timed([a.torch_python, os.path.abspath(__file__), "--torch-worker",
                         batch_file, "--steps", str(a.steps), "--threads", str(a.threads)]
                        + select, env)
            label = run.get("program", "PyTorch " + " ".join(select))
            runs.setdefault(label, []).append(run)
            report(r, label, run)
    cmd = (f"book/instruct_speed.py --torch-python PY --rounds {a.rounds} --steps {a.steps} "
           f"--backends {a.backends}")
    from speed import cpu_model
    write(cmd, cpu_model(), runs)


def report(r, label, run):
    shown = run.get("error") or f"{run['median_ms']:.0f} ms/step"
    print(f"round {r + 1}: {label}: {shown}", file=sys.stderr)


def write(cmd, cpu, runs):
    table = ("| program | ms/step (median) | tokens/s | all runs (ms/step) | peak RSS |\n"
             "|---|---:|---:|---:|---:|\n")
    shape = None
    for label, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:  # the message is in the JSON file
            table += f"| {label} | failed | | | |\n"
            continue
        ms = [r["median_ms"] for r in ok]
        tokens = statistics.median(r["tokens_per_second"] for r in ok)
        rss = statistics.median(r["rss_mb"] for r in ok)
        shape = shape or (ok[0]["batch"], ok[0]["targets"])
        table += (f"| {label} | {statistics.median(ms):.0f} | {tokens:.0f} | "
                  f"{' / '.join(f'{x:.0f}' for x in ms)} | {rss:.0f} MB |\n")
    (b, t), targets = shape or ((0, 0), 0)
    note = (f"\nOne AdamW step of instruction tuning at GPT-2 124M's shape (random weights): a "
            f"batch of {b} x {t} tokens, {targets} of them targets, on {cpu} "
            f"(`nproc` = {os.cpu_count()}); `{cmd}`, rounds in turns, each run the median of "
            f"its timed steps.\n")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "gpt2-instruct.md"), "w") as f:
        f.write(table + note)
    with open(os.path.join(OUT, "gpt2-instruct.json"), "w") as f:
        json.dump({"command": cmd, "cpu": cpu, "runs": runs}, f, indent=1)
    print(table + note)


if __name__ == "__main__":
    main()
