#!/usr/bin/env bash
# Regenerates every recorded output the book includes: runs each chapter binary at its
# defaults (backend and seed below) and copies what it printed and wrote into
# book/src/recorded/<chapter>/, then rebuilds the results tables from the summary.json files
# (book/results.py --readme: the per-chapter results.md, book/src/recorded/results.md and
# the table between README.md's results markers).
#
#   book/record.sh                 # everything the book includes (seed 1337)
#   BACKEND=wgpu book/record.sh ch01_bigram
#   TAG=tiny ARGS="--preset tiny" BACKEND=flex book/record.sh ch04_pretrain
#   book/record.sh compare_backends-ops    # the per-operation costs (compare_backends --ops)
#   book/record.sh ch04_pretrain-samples   # samples of the recorded baby checkpoint (run it after ch04_pretrain)
#   FEATURES=mpi LAUNCH="mpirun -np 2 ..." TAG=mpi2 BACKEND=flex book/record.sh ch11_distributed
#   ARGS="--checkpoint runs/record/ndarray/ch04_pretrain/ckpt/best" BACKEND=flex book/record.sh ch06_generate
# The speed tables against PyTorch come from book/speed.py, book/gpt2_speed.py and
# book/instruct_speed.py (they need a Python with torch and transformers), the
# profiles of chapter 5 from book/perf.sh (it needs perf).
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
BACKEND="${BACKEND:-ndarray}"
SEED="${SEED:-1337}"
# Extra flags for the chapter, and a tag that keeps their recording apart.
ARGS="${ARGS:-}"
# Cargo features of the build (chapter 11: mpi), and a launcher to start the binary with
# (chapter 11: mpirun).
FEATURES="${FEATURES:-}"
LAUNCH="${LAUNCH:-}"
TAG="${TAG:-}"
CHAPTERS=("$@")
if [ ${#CHAPTERS[@]} -eq 0 ]; then
  # Everything the book includes: each chapter at its defaults on ndarray, the backend
  # comparison, then the other backends and presets the result tables show (about two and a
  # half hours on 2 cores: the medium preset, and wgpu on a software driver).
  bash "$self" ch01_bigram ch02_attention ch03_gpt ch04_pretrain ch04_pretrain-samples compare_backends compare_backends-ops
  BACKEND=wgpu bash "$self" ch01_bigram
  TAG=short ARGS="--steps 500 --eval-interval 250 --eval-iters 20" BACKEND=wgpu bash "$self" ch02_attention
  BACKEND=flex bash "$self" ch04_pretrain
  # Chapter 5: the profile, the checks and the step times of the fused kernels (flex).
  BACKEND=flex bash "$self" ch05_fast
  # ... and the matrix products of one lecture step, one by one (section 5.7; half a minute).
  TAG=lecture ARGS="--preset lecture --reps 1 --bench-steps 0 --train-steps 1" BACKEND=flex bash "$self" ch05_fast
  # The medium preset: the smallest model that writes passable Shakespeare (over an hour).
  TAG=medium ARGS="--preset medium" BACKEND=flex bash "$self" ch04_pretrain
  # Chapter 6 on the recorded baby checkpoint, timing the lecture shape too.
  ARGS="--checkpoint runs/record/ndarray/ch04_pretrain/ckpt/best --bench-preset lecture" \
    BACKEND=flex bash "$self" ch06_generate
  TAG=short ARGS="--checkpoint runs/record/ndarray/ch04_pretrain/ckpt/best --max-new-tokens 200 --bench-tokens 200" \
    BACKEND=wgpu bash "$self" ch06_generate
  # Chapter 7: the tokenizer, trained and checked against GPT-2's, then the baby GPT on
  # characters and on BPE tokens (about 7 minutes on flex).
  BACKEND=flex bash "$self" ch07_bpe
  # Chapter 8 on the test fixture (random weights of GPT-2's layout: these machines cannot
  # download the real ones).
  TAG=fixture ARGS="--weights tests/fixtures/ch08/gpt2-tiny/model.safetensors --tokenizer tests/fixtures/ch08/gpt2-tiny/tokenizer.txt --max-new-tokens 60" \
    BACKEND=flex bash "$self" ch08_pretrained
  TAG=gpt1-fixture ARGS="--weights tests/fixtures/ch08/gpt1-tiny/model.safetensors --tokenizer tests/fixtures/ch08/gpt1-tiny/tokenizer --max-new-tokens 40" \
    BACKEND=flex bash "$self" ch08_pretrained
  # Chapter 9 on the default baby checkpoint (`ch04_pretrain`, flex): the spelling task and the
  # four methods, three seeds each (about 3 minutes), then the speaker task...
  ARGS="--part classify --checkpoint runs/ch04_pretrain/ckpt/best" BACKEND=flex bash "$self" ch09_finetune
  TAG=speaker ARGS="--part classify --task speaker --checkpoint runs/ch04_pretrain/ckpt/best" BACKEND=flex bash "$self" ch09_finetune
  # ... and instruction tuning of chapter 4's tiny model on a 512-token BPE of chapter 7 (these
  # machines cannot download GPT-2): `ch07_bpe --vocab-sizes 512 --gpt-vocab-sizes 512
  # --gpt-preset tiny --gpt-steps 1`, then `ch04_pretrain --preset tiny --tokenizer
  # runs/ch07_bpe/bpe-512.txt --block-size 256 --steps 600 --out runs/ch04_bpe`.
  TAG=instruct ARGS="--part instruct --instruct-checkpoint runs/ch04_bpe/ckpt/best --instruct-steps 300 --instruct-lr 1e-3 --responses 10 --max-new-tokens 60" \
    BACKEND=flex bash "$self" ch09_finetune
  # ... and one training step at GPT-2 124M's shape (random weights; book/instruct_speed.py
  # times it against PyTorch).
  TAG=speed ARGS="--part speed" BACKEND=flex bash "$self" ch09_finetune
  # Chapter 10 on wgpu (here Mesa's software Vulkan driver: the checks are real, the times
  # are a CPU's; a GPU machine gives the GPU's).
  ARGS="--profile" BACKEND=wgpu bash "$self" ch10_gpu
  # Chapter 11: the baby preset on two ranks of one thread each (a build with Open MPI).
  FEATURES=mpi LAUNCH="mpirun --allow-run-as-root -np 2 --bind-to core -x RAYON_NUM_THREADS=1" \
    TAG=mpi2 BACKEND=flex bash "$self" ch11_distributed
  # What GPT-2's initialisation is worth on its own (chapter 3 changes only the norm).
  TAG=gpt2-init ARGS="--gpt2-init --no-compare" bash "$self" ch03_gpt
  TAG=bench ARGS="--bench 20" BACKEND=flex bash "$self" ch04_pretrain
  for b in ndarray flex wgpu; do TAG=tiny ARGS="--preset tiny" BACKEND=$b bash "$self" ch04_pretrain; done
  exit 0
fi
TARGET="${CARGO_TARGET_DIR:-target}"

# Cuts DIR/output.txt into DIR/sections/N.M.txt, one file per numbered section the binary
# printed ("== N.M Title ==" up to the next one), and DIR/sections/start.txt for what comes
# before the first: the book shows each part next to the section that explains it.
split_sections() {
  rm -rf "$1/sections"
  mkdir -p "$1/sections"
  awk -v dir="$1/sections" 'BEGIN { f = dir "/start.txt" }
    /^== [0-9]+\.[0-9]+ / { close(f); f = dir "/" $2 ".txt" }
    { print > f }' "$1/output.txt"
}
# The recordings print the corpus path: keep it relative to the checkout, not this machine's.
if [ -n "${GPT_DATA:-}" ]; then export GPT_DATA="$(realpath --relative-to=. "$GPT_DATA")"; fi
if [ -n "${GPT_INSTRUCTIONS:-}" ]; then
  GPT_INSTRUCTIONS="$(realpath --relative-to=. "$GPT_INSTRUCTIONS")"
  export GPT_INSTRUCTIONS
fi
cargo build --release --bins --quiet ${FEATURES:+--features "$FEATURES"}

for ch in "${CHAPTERS[@]}"; do
  if [ "$ch" = compare_backends-ops ]; then
    dest="book/src/recorded/compare_backends-ops"
    mkdir -p "$dest"
    echo "recording compare_backends --ops -> $dest"
    {
      echo "\$ compare_backends --ops --backends ndarray,flex"
      "$TARGET/release/compare_backends" --ops --backends ndarray,flex --out runs/record/compare_backends-ops
    } > "$dest/output.txt"
    cp runs/record/compare_backends-ops/{ops.md,ops.json} "$dest"/
    continue
  fi
  if [ "$ch" = ch04_pretrain-samples ]; then
    # The recorded baby run's best checkpoint, sampled at several temperatures and with top-k.
    dest="book/src/recorded/ch04_pretrain-samples"
    ckpt="runs/record/ndarray/ch04_pretrain/ckpt/best"
    mkdir -p "$dest"
    echo "recording samples from $ckpt -> $dest"
    for opts in "--temperature 0.5" "--temperature 0.8" "--temperature 1.5" "--temperature 1.0 --top-k 5"; do
      name=$(echo "$opts" | tr -d -- '-' | tr ' ' '_')
      {
        echo "\$ ch04_pretrain sample --prompt ROMEO: --max-new-tokens 300 --seed $SEED $opts"
        # shellcheck disable=SC2086 # opts is a list of flags
        "$TARGET/release/ch04_pretrain" sample --checkpoint "$ckpt" --prompt "ROMEO:" \
          --max-new-tokens 300 --seed "$SEED" $opts 2>/dev/null
      } > "$dest/$name.txt"
    done
    continue
  fi
  if [ "$ch" = compare_backends ]; then
    # Every backend in one run, whatever BACKEND says.
    dest="book/src/recorded/compare_backends"
    mkdir -p "$dest"
    echo "recording compare_backends -> $dest"
    {
      echo "\$ compare_backends --seed $SEED"
      "$TARGET/release/compare_backends" --seed "$SEED" --out runs/record/compare_backends
    } > "$dest/output.txt"
    cp runs/record/compare_backends/{results.md,results.json,chart.svg} "$dest"/
    continue
  fi
  out="runs/record/$BACKEND/$ch${TAG:+-$TAG}"
  dest="book/src/recorded/$ch${TAG:+-$TAG}"
  [ "$BACKEND" = ndarray ] || dest="$dest-$BACKEND"
  rm -rf "$out"
  # Recorded into a fresh folder beside the old one, which it replaces only when the run
  # succeeds: nothing an older version wrote is left behind, and a run that fails half-way
  # leaves the old recording as it was.
  tmp="$dest.partial"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  echo "recording $ch on $BACKEND -> $dest"
  {
    echo "\$ ${LAUNCH:+$LAUNCH }$ch --backend $BACKEND --seed $SEED${ARGS:+ $ARGS}"
    # shellcheck disable=SC2086 # LAUNCH and ARGS are lists of words
    $LAUNCH "$TARGET/release/$ch" --backend "$BACKEND" --seed "$SEED" $ARGS --out "$out"
  } > "$tmp/output.txt"
  for f in "$out"/*.svg "$out"/*.csv "$out"/*.json "$out"/*.md; do
    if [ -e "$f" ]; then cp "$f" "$tmp"/; fi
  done
  split_sections "$tmp"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  trap - EXIT
done
python3 book/results.py --readme > book/src/recorded/results.md
echo "wrote book/src/recorded/results.md and the README table"
