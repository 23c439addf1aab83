#!/usr/bin/env bash
# Coverage-guided fuzzing of the parser harnesses with AFL++ and SharpFuzz.
#   bash tests/fuzz/run.sh SECONDS [TARGET ...]     (default: every target; JOBS=2 runs two at a time)
# Builds tests/fuzz/R1V2.Native.Fuzz, instruments the engine's assemblies, runs afl-fuzz on each target for SECONDS with
# tests/fuzz/corpus/TARGET as seeds, and leaves findings in tests/fuzz/findings/TARGET (crashes/, hangs/, queue/).
# Needs AFL++ (Debian: afl++) and the sharpfuzz tool (`dotnet tool restore`).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:?usage: run.sh SECONDS [TARGET ...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors config tokenizer chat jsonl pairs yaml image)
out=tests/fuzz/bin
dotnet build tests/fuzz/R1V2.Native.Fuzz -c Release -o "$out" >/dev/null
for dll in R1V2.Native.Engine.dll R1V2.Native.Trainer.dll; do dotnet sharpfuzz "$out/$dll" >/dev/null; done
# The harness is a .NET assembly: afl-fuzz cannot see its instrumentation in the apphost, SharpFuzz reports it at run time.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_SKIP_BIN_CHECK=1
fuzz() {
  local t=$1
  afl-fuzz -V "$seconds" -t 10000 -m none -i "tests/fuzz/corpus/$t" -o "tests/fuzz/findings/$t" -- "$out/R1V2.Native.Fuzz" "$t" >"tests/fuzz/findings/$t.log" 2>&1 || true
  local stats="tests/fuzz/findings/$t/default/fuzzer_stats"
  if [ -f "$stats" ]; then
    echo "$t: $(grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|saved_crashes|saved_hangs)' "$stats" | tr -s ' ' | paste -sd' ' -)"
  else
    echo "$t: afl-fuzz did not start"; tail -5 "tests/fuzz/findings/$t.log"
  fi
}
mkdir -p tests/fuzz/findings
jobs_max=${JOBS:-1}
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
  echo "==> $t for $seconds s"
  fuzz "$t" &
done
wait
