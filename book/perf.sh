#!/usr/bin/env bash
# Where a `baby` training step spends its CPU time, by function, with Burn's operations and with
# chapter 5's fused kernels: `perf record` over `ch04_pretrain --bench 40` on flex, then the
# top of `perf report` (self time, all threads). Writes book/src/recorded/ch05_fast-perf/.
#
#   book/perf.sh        # needs perf (linux-perf) and a release build
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet --bin ch04_pretrain
dest=book/src/recorded/ch05_fast-perf
mkdir -p "$dest"
tmp=$(mktemp -d)
for kernels in burn fused; do
  perf record -q -F 999 -o "$tmp/perf.data" "$TARGET/release/ch04_pretrain" --backend flex \
    --preset baby --bench 40 --kernels "$kernels" --out "$tmp/run" > "$tmp/bench.txt" 2>&1
  {
    echo "\$ perf record -F 999 ch04_pretrain --backend flex --preset baby --bench 40 --kernels $kernels"
    grep "median" "$tmp/bench.txt"
    echo "share of CPU samples  function"
    # awk, not head: reading to the end spares perf a broken pipe.
    perf report -q -i "$tmp/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
      | awk '/^ +[0-9]/ && n++ < 15' | sed -E 's/ +\[[.k]\] / /' | cut -c1-110 | sed -E 's/ +$//'
  } > "$dest/$kernels.txt"
  echo "wrote $dest/$kernels.txt"
done
rm -rf "$tmp"
