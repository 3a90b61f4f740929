#!/usr/bin/env bash
# Peak RSS of `handoff run --dry-run` on a 1,000-case suite (target: < 50 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HANDOFF:-target/release/handoff}
[ -x "$bin" ] || cargo build --release -p handoff-cli
# The parent streams cases; its peak RSS must not grow with their number.
python3 - "$bin" <<'PY'
import resource, subprocess, sys
out = subprocess.run([sys.argv[1], "run", "suites/bench-1000-cases.yaml", "--dry-run"],
                     stdout=subprocess.PIPE, check=True).stdout
cases = out.decode().split("\n")[0]
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"{cases}; peak RSS {rss:.1f} MB (target < 50 MB)")
sys.exit(0 if rss < 50 else 1)
PY
