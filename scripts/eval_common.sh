# Sourced by the evaluation scripts (from the repository root): builds the
# release binary if $bin is missing, fetches what runs need, and records
# the CPU the figures come from in $1/cpu.txt.
eval_prepare() {
  if [ ! -x "$bin" ]; then
    PROTOC="$PWD/scripts/protoc" cargo build --release --locked -p handoff-cli
  fi
  "$bin" setup >/dev/null
  mkdir -p "$1"
  grep -o 'avx512_vnni\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ' > "$1/cpu.txt" || true
  grep -m1 'model name' /proc/cpuinfo >> "$1/cpu.txt" || true
}
