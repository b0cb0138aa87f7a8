#!/usr/bin/env python3
"""Builds the book's result tables from the recorded summary.json files.

Writes book/src/recorded/<chapter>/results.md (that chapter, every recorded backend) and
prints the table of all chapters (book/record.sh saves it as book/src/recorded/results.md).
With --readme it also puts that table into README.md, between its results markers.
The seed it names comes from the summary.json files.
"""
import argparse
import glob
import json
import os
import platform

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "recorded")


def cpu():
    """This machine's CPU, for recordings made before summary.json named theirs."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


HEADER = ("| chapter | model | backend | steps | parameters | train loss | val loss | wall time | tokens/s |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|")

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--readme", action="store_true",
                help="also update the table between README.md's results markers")
args = ap.parse_args()

by_chapter = {}
seeds = set()
cpus = set()
def order(path):
    # The chapter's default recording (ndarray) first, then the others by folder name.
    folder = os.path.basename(os.path.dirname(path))
    return (folder.split("-")[0], "-" in folder, folder)


for path in sorted(glob.glob(os.path.join(root, "*", "summary.json")), key=order):
    with open(path) as f:
        s = json.load(f)
    if "final_val_loss" not in s:
        continue  # a chapter that trains nothing (generation)
    seeds.add(s["seed"])
    cpus.add(s.get("cpu") or cpu())
    hp = s.get("hyperparameters")
    preset = hp.get("preset", "") if isinstance(hp, dict) else ""
    model = hp.get("model", {}) if isinstance(hp, dict) else {}
    # Chapter 3's variants are named by their norm; say when GPT-2's init was on too.
    init = " + GPT-2 init" if s["chapter"] == "ch03_gpt" and model.get("gpt2_init") else ""
    models = s.get("variants") or [{
        "name": (f"preset {preset}" if preset else "")
        + (f", {hp['ranks']} ranks" if isinstance(hp, dict) and hp.get("ranks", 1) > 1 else ""),
        "parameters": s["parameters"], "final_train_loss": s["final_train_loss"],
        "final_val_loss": s["final_val_loss"], "wall_seconds": s["wall_seconds"],
        "tokens_per_second": s["tokens_per_second"],
    }]
    for m in models:
        row = (f"| {s['chapter']} | {m['name']}{init} | {s['backend']} | {s['steps']} | "
               f"{m['parameters']:,} | {m['final_train_loss']:.4f} | {m['final_val_loss']:.4f} | "
               f"{m['wall_seconds']:.1f} s | {m['tokens_per_second']:,.0f} |")
        by_chapter.setdefault(s["chapter"], []).append(row)

seeds = sorted(seeds)  # every recording's seed: usually just record.sh's default
seed = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))
NOTE = (f"Recorded by `book/record.sh` ({seed}) on {' and '.join(sorted(cpus))}, {os.cpu_count()} cores. "
        "Wall time includes evaluations; tokens/s counts training steps only.")

for chapter, rows in by_chapter.items():
    os.makedirs(os.path.join(root, chapter), exist_ok=True)
    with open(os.path.join(root, chapter, "results.md"), "w") as f:
        f.write("\n".join([HEADER, *rows, "", NOTE, ""]))

table = "\n".join([HEADER, *[r for rows in by_chapter.values() for r in rows], "", NOTE])
print(table)

if args.readme:
    # The README carries the same table between its markers.
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(readme) as f:
        text = f.read()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {begin} ... {end} block to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = ("\nAt each chapter's defaults, `--backend ndarray` unless the table says otherwise "
            f"(commands: `book/record.sh`, which runs `<chapter> --backend B --seed "
            f"{seeds[0] if len(seeds) == 1 else 'S'}`):\n\n")
    with open(readme, "w") as f:
        f.write(head + begin + body + table + "\n" + end + tail)
