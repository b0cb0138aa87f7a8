#!/usr/bin/env python3
"""Generation speed at GPT-2 124M's size, side by side: the course's decoder on each backend
and Hugging Face `transformers`' `generate`, with the cache on and off.

Random weights of GPT-2 124M's exact shape cost the same to run as the real ones, so no
download is needed: the script makes them with tests/fixtures/ch08/make_fixtures.py when
--weights does not exist yet. Each program runs in turns, ROUNDS times (a shared machine
varies by 5-10% from minute to minute), each time in a fresh process, and the table shows
each program's median run, with its peak resident memory (/usr/bin/time).

    book/gpt2_speed.py --torch-python ~/torchvenv/bin/python [--rounds 3] [--tokens 100]
                       [--weights /tmp/gpt2-shape/model.safetensors]
                       [--backends flex,ndarray,wgpu]

Writes book/src/recorded/speed/gpt2-generate.md (and .json, the raw runs and any error
message); `--render` writes the table again from the JSON file without running anything.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from speed import cpu_model, sh  # book/speed.py, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))
OUT = os.path.join(ROOT, "book", "src", "recorded", "speed")


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time; returns its last stdout line as JSON, plus peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        rss = os.path.join(d, "rss")
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss] + cmd, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:]
            return {"error": tail[0] if tail else f"exit {p.returncode}"}
        run = json.loads(p.stdout.strip().splitlines()[-1])
        with open(rss) as f:
            run["rss_mb"] = int(f.read().split()[-1]) / 1024
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-python", required=True, help="a Python with torch and transformers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--weights", default="/tmp/gpt2-shape/model.safetensors")
    ap.add_argument("--backends", default="flex,ndarray,wgpu")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: write the table again from the JSON file's runs")
    a = ap.parse_args()
    if a.render:
        with open(os.path.join(OUT, "gpt2-generate.json")) as f:
            saved = json.load(f)
        flags = saved["command"].replace("--torch-python PY", "").split()[1:]
        write(ap.parse_args(flags + ["--torch-python", "PY"]), saved["runs"])
        return
    if not os.path.exists(a.weights):
        sh([a.torch_python, os.path.join(ROOT, "tests/fixtures/ch08/make_fixtures.py"),
            "--gpt2-shape", os.path.dirname(a.weights)])
    sh(["cargo", "build", "--release", "--quiet", "--bin", "ch08_pretrained"], cwd=ROOT)
    binary = os.path.join(TARGET, "release", "ch08_pretrained")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    programs = []
    for cached in [True, False]:
        flag = [] if cached else ["--no-cache"]
        hf = [a.torch_python, os.path.join(ROOT, "book", "hf_generate.py"), "--weights",
              a.weights, "--tokens", str(a.tokens)] + flag
        programs.append(("transformers `generate`, PyTorch, 2 threads", cached, hf))
        for backend in a.backends.split(","):
            with_out = tempfile.mkdtemp(prefix="gpt2-speed-")
            cmd = [binary, "--backend", backend, "--weights", a.weights, "--bench",
                   "--max-new-tokens", str(a.tokens), "--out", with_out] + flag
            programs.append((f"this course, {backend}", cached, cmd))
    runs = {f"{label}|{cached}": [] for label, cached, _ in programs}
    for r in range(a.rounds):
        for label, cached, cmd in programs:
            run = timed(cmd, env)
            runs[f"{label}|{cached}"].append(run)
            shown = run.get("error") or f"{run['tokens_per_second']:.1f} tokens/s"
            print(f"round {r + 1}: {label}, cache {cached}: {shown}", file=sys.stderr)
    write(a, runs)


def write(a, runs):
    table = ("| program | cache | tokens/s (median) | all runs | peak RSS |\n"
             "|---|---|---:|---:|---:|\n")
    for key, rs in runs.items():
        label, cached = key.split("|")
        cache = "on" if cached == "True" else "off"
        errors = [r["error"] for r in rs if "error" in r]
        if errors:  # the message is in the JSON file
            table += f"| {label} | {cache} | failed at load | | |\n"
            continue
        rates = [r["tokens_per_second"] for r in rs]
        rss = statistics.median(r["rss_mb"] for r in rs)
        table += (f"| {label} | {cache} | {statistics.median(rates):.1f} | "
                  f"{' / '.join(f'{x:.1f}' for x in rates)} | {rss:.0f} MB |\n")
    cmd = (f"book/gpt2_speed.py --torch-python PY --rounds {a.rounds} --tokens {a.tokens} "
           f"--backends {a.backends}")
    note = (f"\nGPT-2 124M's shape (random weights), a 3-token prompt, {a.tokens} new tokens "
            f"sampled at temperature 0.8, on {cpu_model()} (`nproc` = {os.cpu_count()}); "
            f"`{cmd}`, {a.rounds} rounds in turns.\n")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "gpt2-generate.md"), "w") as f:
        f.write(table + note)
    with open(os.path.join(OUT, "gpt2-generate.json"), "w") as f:
        json.dump({"command": cmd, "cpu": cpu_model(), "runs": runs}, f, indent=1)
    print(table + note)


if __name__ == "__main__":
    main()
