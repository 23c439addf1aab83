#!/usr/bin/env pwsh
# R1V2.Native build entry point. Run through the local tool manifest: `dotnet tool restore; dotnet pwsh ./build.ps1 <target>`.
#   build    compile the solution (Release)
#   test     run the whole test suite (CPU; GPU tests skip themselves with the reason where no GPU is present)
#   kernels  compile every CUDA kernel with NVRTC for sm_80 and sm_90 (no GPU needed) and print resource use
#   bench    CPU op benchmarks (BenchmarkDotNet) and, where a GPU is present, `engine bench kernels`
#   gpu      on a GPU machine: the CUDA parity tests, engine tune, the kernel benchmarks (writing the GPU's baseline when it
#            has none) and the model, generation and serving benchmarks in one go, results under perf/results/
param(
    [Parameter(Position = 0)][ValidateSet('build', 'test', 'kernels', 'bench', 'gpu')][string]$Target = 'build',
    [string]$Configuration = 'Release',
    [string]$Arch = 'sm_80,sm_90'
)
$ErrorActionPreference = 'Stop'
Set-Location $PSScriptRoot

function Invoke-Step([string]$what, [scriptblock]$block) {
    Write-Host "==> $what" -ForegroundColor Cyan
    & $block
    if ($LASTEXITCODE -ne 0) { throw "$what failed with exit code $LASTEXITCODE" }
}

$engine = @('run', '--project', 'src/Cli', '-c', $Configuration, '--')
switch ($Target) {
    'build' { Invoke-Step 'build' { dotnet build R1V2.Native.sln -c $Configuration } }
    'test' { Invoke-Step 'test' { dotnet test R1V2.Native.sln -c $Configuration } }
    'kernels' { Invoke-Step "compile kernels for $Arch" { dotnet @engine kernels --arch $Arch } }
    'bench' {
        Invoke-Step 'CPU op benchmarks' { dotnet run -c Release --project perf/R1V2.Native.Perf -- --filter '*' --exporters json --artifacts perf/results/cpu }
        Invoke-Step 'CUDA kernel benchmarks' { dotnet @engine bench kernels --out perf/results }
    }
    'gpu' {
        $stamp = Get-Date -Format 'yyyyMMdd-HHmmss'
        Invoke-Step 'CUDA parity tests' {
            dotnet test tests/R1V2.Native.Tests -c $Configuration --filter 'FullyQualifiedName~CudaParity|FullyQualifiedName~KernelCompile|FullyQualifiedName~Cli' `
                --logger "trx;LogFileName=gpu-parity-$stamp.trx" --results-directory perf/results
        }
        Invoke-Step 'kernel tuning' { dotnet @engine tune }
        $gpuBaseline = if (Test-Path perf/baselines) { @() } else { @('--write-baseline') }
        Invoke-Step 'CUDA kernel benchmarks' { dotnet @engine bench kernels --out perf/results @gpuBaseline }
        Invoke-Step 'model step benchmarks' {
            dotnet @engine bench model --config configs/small.json --sequences 8 --tokens 512 --tiles 1 --backend cuda --out perf/results
        }
        Invoke-Step 'generation benchmarks' {
            dotnet @engine bench generate --config configs/small.json --batch 1,8,64 --prompt 256 --new 64 --backend cuda --out perf/results
        }
        Invoke-Step 'serving benchmarks' { dotnet @engine bench serve --backend cuda --out perf/results }
    }
}
