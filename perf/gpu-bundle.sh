#!/usr/bin/env bash
# The CUDA checks on a GPU machine that has no .NET SDK: the CUDA-gated tests (parity, the bit-for-bit repeat of a CUDA
# run), `engine tune`, the kernel benchmark (writing its baseline), decode and model benchmarks, and the default
# pipeline on CUDA.
#
#   perf/gpu-bundle.sh pack [DIR]     on a machine with the SDK: builds the tests (Release) and writes DIR (default
#                                     .gpu-bundle/): the .NET runtime, the test build with the xunit console runner,
#                                     and this script. About 38 MB.
#   DIR/gpu-bundle.sh run OUT [SECS]  on the GPU machine, from the repository root: unpacks, finds libnvrtc, libcublas
#                                     and libcublasLt (CUDA toolkit or the nvidia-* Python wheels), and writes to OUT:
#                                     log.txt, tests.xml, tests.log, the benchmark JSON files, pipeline.log and
#                                     pipeline.tgz (the run directory without weights). SECS (default 480) caps the run.
#
# Processes that share one GPU slow each other down many times over (launch-bound work): run one job at a time.
set -euo pipefail

cmd=${1:-}
here=$(cd "$(dirname "$0")" && pwd)

pack() {
    local dir=${1:-.gpu-bundle} root
    root=$(cd "$here/.." && pwd)
    mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
    dotnet build -c Release "$root/tests/R1V2.Native.Tests" >/dev/null
    local runner=$HOME/.nuget/packages/xunit.runner.console/2.4.1/tools/netcoreapp2.0
    if [ ! -d "$runner" ]; then
        local tmp; tmp=$(mktemp -d)
        printf '%s\n' '<Project Sdk="Microsoft.NET.Sdk"><PropertyGroup><TargetFramework>net10.0</TargetFramework></PropertyGroup>' \
            '<ItemGroup><PackageDownload Include="xunit.runner.console" Version="[2.4.1]" /></ItemGroup></Project>' > "$tmp/r.csproj"
        dotnet restore "$tmp/r.csproj" >/dev/null
        rm -rf "$tmp"
    fi
    local out=$root/tests/R1V2.Native.Tests/bin/Release/net10.0 dotnetRoot
    # The console runner sits beside the tests so that the tests' base directory is their own.
    cp "$runner"/* "$out/"
    dotnetRoot=$(dirname "$(readlink -f "$(command -v dotnet)")")
    tar -C "$dotnetRoot" -cf - dotnet host shared/Microsoft.NETCore.App | xz -T0 -6 > "$dir/dotnet.tar.xz"
    tar -C "$out" --exclude='runtimes/linux-arm*' --exclude='runtimes/linux-bionic*' --exclude='runtimes/linux-musl*' \
        --exclude='runtimes/linux-loong*' --exclude='runtimes/linux-riscv*' --exclude='runtimes/linux-x86' \
        --exclude='runtimes/osx*' --exclude='runtimes/win*' -cf - . | xz -T0 -6 > "$dir/tests.tar.xz"
    cp "$0" "$dir/gpu-bundle.sh"
    du -sh "$dir"
}

run() {
    local out=${1:?usage: gpu-bundle.sh run OUT [SECS]} deadline=${2:-480} t0
    mkdir -p "$out"; out=$(cd "$out" && pwd)
    t0=$(date +%s)
    local log=$out/log.txt
    note() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$log"; }
    left() { local r=$(( deadline - ($(date +%s) - t0) )); [ "$r" -lt "$1" ] && echo $(( r > 5 ? r : 5 )) || echo "$1"; }
    step() { local cap=$1; shift; note "$*"; set +e; timeout -k 5 "$(left "$cap")" "$@" >>"$log" 2>&1; note "rc=$?"; set -e; }

    local dn=/tmp/r1v2-dotnet tests=$PWD/tests/R1V2.Native.Tests/bin/Release/net10.0
    mkdir -p "$dn" "$tests"
    tar -C "$dn" -xJf "$here/dotnet.tar.xz"
    tar -C "$tests" -xJf "$here/tests.tar.xz"
    export DOTNET_ROOT=$dn PATH=$dn:$PATH DOTNET_ROLL_FORWARD=Major DOTNET_CLI_TELEMETRY_OPTOUT=1 \
        DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=1 R1V2_KERNEL_CACHE=/tmp/r1v2-kernels NO_COLOR=1
    local libs
    libs=$(timeout 30 find /usr/local /opt /usr/lib -maxdepth 9 \( -name 'libnvrtc.so.1*' -o -name 'libcublas.so.1*' \
        -o -name 'libcublasLt.so.1*' \) 2>/dev/null | sort || true)
    export LD_LIBRARY_PATH=$(for f in $libs; do dirname "$f"; done | sort -u | tr '\n' ':')${LD_LIBRARY_PATH:-}
    note "unpacked; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi >>"$log" 2>&1 || true

    local engine="dotnet $tests/engine.dll"
    step 30 $engine info
    note "tests"
    set +e
    timeout -k 5 "$(left 240)" dotnet "$tests/xunit.console.dll" "$tests/R1V2.Native.Tests.dll" -nocolor -parallel none \
        -xml "$out/tests.xml" -class R1V2.Native.Tests.Ops.CudaParityTests -class R1V2.Native.Tests.Models.VlmCudaParityTests \
        -class R1V2.Native.Tests.Kernels.KernelCompileTests -class R1V2.Native.Tests.Interop.NativeLibraryTests \
        -class R1V2.Native.Tests.Cli.CliTests -method R1V2.Native.Tests.Cli.TrainCommandTests.GrpoRun_OnCuda_WritesTheSameCheckpointBytesTwice \
        >"$out/tests.log" 2>&1
    note "tests rc=$?"; tail -2 "$out/tests.log" >>"$log"
    set -e
    step 120 $engine tune --cache "$out/tuning"
    step 90 $engine bench kernels --out "$out" --write-baseline
    [ -d perf/baselines ] && cp -r perf/baselines "$out/" || true
    step 45 $engine bench generate --config configs/digits.json --batch 1,16,64 --backend cuda --out "$out"
    step 45 $engine bench model --config configs/small.json --sequences 4 --tokens 256 --backend cuda --out "$out"
    note "pipeline"
    set +e
    timeout -k 5 "$(left 240)" $engine train --backend cuda --out /tmp/r1v2-run >"$out/pipeline.log" 2>&1
    note "pipeline rc=$?"
    set -e
    if [ -d /tmp/r1v2-run ]; then
        tar -C /tmp/r1v2-run -czf "$out/pipeline.tgz" --exclude='*.safetensors' --exclude=checkpoints --exclude=images .
    fi
    note done
}

case "$cmd" in
    pack) shift; pack "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
