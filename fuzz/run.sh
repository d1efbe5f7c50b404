#!/usr/bin/env bash
# `make fuzz`: runs each cargo-fuzz target for FUZZ_SECONDS (default 60), seeded with the protocol
# examples. Installs cargo-fuzz if missing. Uses the nightly toolchain when rustup has it, otherwise
# stable with RUSTC_BOOTSTRAP=1 (libFuzzer instrumentation needs nightly-only flags).
set -euo pipefail
cd "$(dirname "$0")"
secs="${FUZZ_SECONDS:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then tc=(+nightly); else tc=(); export RUSTC_BOOTSTRAP=1; fi
examples="../../shared/protocol/examples"
for t in signature envelope event; do
  mkdir -p "corpus/$t"
  for f in "$examples"/*.json; do python3 -c 'import json,sys;print(json.dumps(json.load(open(sys.argv[1])),separators=(",",":")),end="")' "$f" >"corpus/$t/$(basename "$f")"; done
  echo "== fuzz $t for ${secs}s"
  cargo "${tc[@]}" fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=1024 -max_len=65536 2>&1 | tee "fuzz-$t.log" | grep -E "ERROR|panicked" || true
  if grep -qE "ERROR: libFuzzer|panicked|deadly signal" "fuzz-$t.log"; then echo "fuzz $t found a crash; see fuzz/fuzz-$t.log and fuzz/artifacts/$t" >&2; exit 1; fi
  grep -E "^Done [0-9]+ runs" "fuzz-$t.log" || true
done
