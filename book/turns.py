#!/usr/bin/env python3
"""Times commands in turns: round 1 runs each once, then round 2, and so on, so that a busy
moment of a shared machine hits every command alike. Each command must print chapter 4's
benchmark line ("median of N: X ms/step"); prints each command's median and best run.

    book/turns.py 6 "before=/tmp/ch04_old --preset baby --bench 40" \\
                    "after=target/release/ch04_pretrain --preset baby --bench 40"
"""
import re
import statistics
import subprocess
import sys


def main():
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit(__doc__)
    rounds = int(sys.argv[1])
    programs = [arg.split("=", 1) for arg in sys.argv[2:]]
    times = {label: [] for label, _ in programs}
    for r in range(rounds):
        for label, cmd in programs:
            out = subprocess.run(cmd, shell=True, capture_output=True, text=True)
            found = re.search(r"median of \d+: ([\d.]+) ms/step", out.stdout)
            if not found:
                sys.exit(f"{label}: no benchmark line in its output\n{out.stdout}{out.stderr}")
            times[label].append(float(found.group(1)))
            print(f"round {r + 1}: {label}: {found.group(1)} ms/step", file=sys.stderr)
    print("| program | median ms/step | best | all runs |\n|---|---:|---:|---|")
    for label, t in times.items():
        runs = " / ".join(f"{x:.1f}" for x in t)
        print(f"| {label} | {statistics.median(t):.1f} | {min(t):.1f} | {runs} |")


if __name__ == "__main__":
    main()
