#!/usr/bin/env python3
"""Training speed on the CPU, side by side: PyTorch and this course's CPU backends.

Runs `ch04_pretrain --bench STEPS` (flex and ndarray) for the current build and, if asked,
for an older commit, plus the PyTorch reference (`torch_gpt.py --bench-steps STEPS`) when a
Python with torch is given, in turns, ROUNDS times, and writes the table of each program's
median run to book/src/recorded/speed/<preset>.md (with the raw runs in <preset>.json).
Alternating matters: on a shared machine the same command varies by 5-10% from minute to minute.

    book/speed.py [--rounds 3] [--steps 40] [--preset baby]
                  [--torch-python /tmp/torchvenv/bin/python] [--before REV]
    book/speed.py --preset lecture --rounds 1 --steps 2 --warmup 1 \
                  --backends ndarray,flex,wgpu --name lecture-backends

--backends picks the Burn backends (default flex,ndarray), each optionally with its kernels
(`flex:burn`, `flex:fused`; without, the binary's default: fused where they run); --warmup the untimed steps before
the timed ones (default 3); --name the file name (default: the preset); --peak the machine's
practical fp32 peak for the "share" column (default 270, this course's machine; measure yours
with book/torch_peak.py). `book/speed.py --render NAME` runs nothing and writes NAME.md again
from NAME.json (after a change of --peak, say).

--peak-each-run (with --torch-python) measures that peak again right before every run
(`book/torch_peak.py 2048`, best of 10 products, about a second) and adds a column with each
run's GFLOP/s as a share of the peak measured just before it: on a shared machine the peak
itself moves by 10-20% from minute to minute, and a run is best compared with the machine
as it was during that run.

--before REV builds REV's ch04_pretrain in a temporary git worktree, into its own target
folder ($CARGO_TARGET_DIR/speed-before/<sha>: the first time, a full build), and times it
too, as the "before" rows. Needs GPT_DATA (the corpus) and /usr/bin/time.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As cargo sees it when run in ROOT (a relative CARGO_TARGET_DIR is relative to ROOT).
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))
TORCH_SCRIPT = os.path.join(ROOT, "book", "reference", "torch_gpt.py")
# The practical fp32 peak of the course's 2-core Intel Xeon (AVX-512), from `book/torch_peak.py`
# (PyTorch's square products reach 265-272 GFLOP/s); give --peak for another machine.
PEAK_GFLOPS = 270.0
TORCH_PRESETS = {  # torch_gpt.py flags for the course's presets
    "baby": [],
    "medium": ["--n-layer", "6", "--n-head", "6", "--n-embd", "192", "--block-size", "128",
               "--batch-size", "32", "--dropout", "0.1"],
    "lecture": ["--n-layer", "6", "--n-head", "6", "--n-embd", "384", "--block-size", "256",
                "--batch-size", "64", "--dropout", "0.2"],
}


def cpu_model():
    """The CPU's name as lscpu gives it (speed depends on it: AVX2 against AVX-512)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def sh(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, **kw)


def build(rev=None):
    """Path of a freshly built ch04_pretrain (of commit `rev`, or of the working tree)."""
    cargo = ["cargo", "build", "--release", "--quiet", "--bin", "ch04_pretrain"]
    if rev is None:
        # Another checkout may have built the same crate into this target folder: touch the
        # sources so that cargo rebuilds from these files.
        for d, _, files in os.walk(os.path.join(ROOT, "chapters")):
            for f in files:
                os.utime(os.path.join(d, f))
        sh(cargo, cwd=ROOT)
        target, name = TARGET, "current"
    else:
        # The old commit gets a target folder of its own, so that its binary can never be the
        # working tree's (nor the other way round).
        sha = sh(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=ROOT,
                 stdout=subprocess.PIPE, text=True).stdout.strip()
        target, name = os.path.join(TARGET, "speed-before", sha), sha
        print(f"building {rev} ({sha[:12]}) into {target}", file=sys.stderr)
        wt = tempfile.mkdtemp(prefix="speed-")
        sh(["git", "worktree", "add", "--detach", wt, sha], cwd=ROOT)
        try:
            sh(cargo, cwd=wt, env=dict(os.environ, CARGO_TARGET_DIR=target))
        finally:
            sh(["git", "worktree", "remove", "--force", wt], cwd=ROOT)
    # Time a copy: a later build into the same target folder can't replace it mid-run.
    out = os.path.join(TARGET, "speed-bins")
    os.makedirs(out, exist_ok=True)
    dest = os.path.join(out, name)
    sh(["cp", os.path.join(target, "release", "ch04_pretrain"), dest])
    return dest


def run_burn(binary, backend, preset, steps, warmup):
    backend, _, kernels = backend.partition(":")  # e.g. "flex:burn"
    with tempfile.TemporaryDirectory() as d:
        rss = os.path.join(d, "rss")
        sh(["/usr/bin/time", "-f", "%M", "-o", rss, binary, "--preset", preset, "--backend",
            backend, "--bench", str(steps), "--bench-warmup", str(warmup), "--out", d]
           + (["--kernels", kernels] if kernels else []),
           stdout=subprocess.DEVNULL)
        with open(os.path.join(d, "bench.json")) as f:
            b = json.load(f)
        with open(rss) as f:
            rss_kb = int(f.read().split()[-1])
    return {"ms": b["median_ms_per_step"], "tokens_per_s": b["tokens_per_s"],
            "gflops": b["gflops"], "rss_mb": rss_kb / 1024, "first_ms": b["first_step_ms"]}


def measure_peak(python):
    """The machine's fp32 peak right now: PyTorch's best 2048 x 2048 product, GFLOP/s."""
    p = sh([python, os.path.join(ROOT, "book", "torch_peak.py"), "2048"],
           stdout=subprocess.PIPE, text=True)
    return float(p.stdout.split("PyTorch")[1].split()[0])


def run_torch(python, preset, steps):
    with tempfile.TemporaryDirectory() as d:
        rss = os.path.join(d, "rss")
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        p = sh(["/usr/bin/time", "-f", "%M", "-o", rss, python, TORCH_SCRIPT, "--data",
                os.environ["GPT_DATA"], "--threads", "2", "--bench-steps", str(steps)]
               + TORCH_PRESETS[preset], stdout=subprocess.PIPE, text=True, env=env)
        b = json.loads(p.stdout.strip().splitlines()[-1])
        with open(rss) as f:
            rss_kb = int(f.read().split()[-1])
    return {"ms": b["median_ms_per_step"], "tokens_per_s": b["tokens_per_s"],
            "gflops": b["achieved_gflops"], "rss_mb": rss_kb / 1024, "torch": b["torch"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", default="baby", choices=sorted(TORCH_PRESETS))
    ap.add_argument("--torch-python", help="a Python with torch installed")
    ap.add_argument("--before", help="also time this older commit")
    ap.add_argument("--backends", default="flex,ndarray")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--name", help="file name of the table (default: the preset)")
    ap.add_argument("--peak", type=float, default=PEAK_GFLOPS,
                    help="the machine's practical fp32 peak, GFLOP/s (book/torch_peak.py)")
    ap.add_argument("--peak-each-run", action="store_true",
                    help="measure the peak before every run (needs --torch-python)")
    ap.add_argument("--render", metavar="NAME",
                    help="run nothing: write NAME.md again from NAME.json's runs and command")
    a = ap.parse_args()
    if a.render:
        with open(os.path.join(ROOT, "book", "src", "recorded", "speed", f"{a.render}.json")) as f:
            saved = json.load(f)
        peak = a.peak
        a = ap.parse_args(saved["command"].replace("--torch-python PY", "").split()[1:])
        a.peak = peak
        a.torch_python = "PY" if any(k.startswith("PyTorch") for k in saved["runs"]) else None
        write_table(a, saved["runs"])
        return
    if a.peak_each_run and not a.torch_python:
        ap.error("--peak-each-run needs --torch-python")
    write_table(a, measure(a))


def measure(a):
    """Runs every program ROUNDS times in turns; returns {label: [one run's figures, ...]}."""

    programs = []  # (label, function returning one run's figures)
    if a.torch_python:
        programs.append(("PyTorch, 2 threads (`torch_gpt.py`)",
                         lambda: run_torch(a.torch_python, a.preset, a.steps)))
    bins = []
    if a.before:
        bins.append((f"before (`{a.before}`)", build(a.before)))
    bins.append(("this version" if a.before else "", build()))
    for backend in a.backends.split(","):
        for label, binary in bins:
            shown = backend.replace(":fused", ", fused kernels").replace(":burn", ", Burn's kernels")
            programs.append((f"Burn {shown}" + (f", {label}" if label else ""),
                             lambda b=binary, k=backend: run_burn(b, k, a.preset, a.steps,
                                                                  a.warmup)))

    runs = {label: [] for label, _ in programs}
    for r in range(a.rounds):
        for label, run in programs:
            peak = measure_peak(a.torch_python) if a.peak_each_run else None
            runs[label].append(run())
            if peak is not None:
                runs[label][-1]["peak_gflops"] = peak
            print(f"round {r + 1}: {label}: {runs[label][-1]['ms']:.1f} ms/step", file=sys.stderr)
    return runs


def write_table(a, runs):
    """The markdown table of each program's median run, and the raw runs as JSON."""
    name = a.name or a.preset
    torch_ms = None
    rows = []
    for label, rs in runs.items():
        mid = sorted(rs, key=lambda x: x["ms"])[len(rs) // 2]  # the median run
        if label.startswith("PyTorch"):
            torch_ms = mid["ms"]
        rows.append((label, mid, rs))
    # Each run's GFLOP/s against the peak measured just before it (--peak-each-run).
    each = all("peak_gflops" in x for rs in runs.values() for x in rs)
    unit, scale = ("s", 1e-3) if a.preset == "lecture" else ("ms", 1.0)
    table = (f"| program | first step, s | {unit}/step (median run) | all runs | tokens/s | GFLOP/s "
             f"| share of ~{a.peak:.0f} GFLOP/s "
             + ("| share of the peak measured before each run: median (all runs) " if each else "")
             + "| PyTorch time / this | peak RSS |\n"
             + "|---|---:|---:|---:|---:|---:|---:" + ("|---:" if each else "") + "|---:|---:|\n")
    for label, m, rs in rows:
        ratio = f"{torch_ms / m['ms']:.2f}" if torch_ms else "-"
        first = f"{m['first_ms'] / 1e3:.1f}" if "first_ms" in m else "-"
        shares = [100 * x["gflops"] / x["peak_gflops"] for x in rs] if each else []
        share = (f"{statistics.median(shares):.0f}% ({' / '.join(f'{x:.0f}%' for x in shares)}) | "
                 if each else "")
        all_ms = " / ".join(f"{x['ms'] * scale:.1f}" for x in rs)
        table += (f"| {label} | {first} | {m['ms'] * scale:.1f} | {all_ms} | "
                  f"{m['tokens_per_s']:,.0f} | {m['gflops']:.1f} | "
                  f"{100 * m['gflops'] / a.peak:.0f}% | {share}{ratio} | {m['rss_mb']:.0f} MB |\n")
    if each:
        peaks = sorted(x["peak_gflops"] for rs in runs.values() for x in rs)
        table += (f"\nThe peak measured before each run (`book/torch_peak.py 2048`) ranged from "
                  f"{peaks[0]:.0f} to {peaks[-1]:.0f} GFLOP/s (median "
                  f"{statistics.median(peaks):.0f}).\n")
    cmd = f"book/speed.py --rounds {a.rounds} --steps {a.steps} --preset {a.preset}"
    if a.backends != "flex,ndarray":
        cmd += f" --backends {a.backends}"
    if a.warmup != 3:
        cmd += f" --warmup {a.warmup}"
    if a.name:
        cmd += f" --name {a.name}"
    if a.before:
        cmd += f" --before {a.before}"
    if a.peak != PEAK_GFLOPS:
        cmd += f" --peak {a.peak:g}"
    if a.peak_each_run:
        cmd += " --peak-each-run"
    if a.torch_python:
        cmd += " --torch-python PY"
    rounds = f"{a.rounds} rounds in turns" if a.rounds > 1 else "1 round"
    table += (f"\n`{cmd}`: {rounds}, each the median of {a.steps} steps after "
              f"{a.warmup} warm-up steps; peak RSS of that whole run (`/usr/bin/time`); "
              f"{os.cpu_count()} cores of an {cpu_model()}.\n")
    out = os.path.join(ROOT, "book", "src", "recorded", "speed")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"command": cmd, "runs": runs}, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
