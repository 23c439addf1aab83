// Shared helpers for every kernel family: our own bf16 type (NVRTC 11.8 ships no cuda_bf16.h), loads and stores that
// widen to fp32, warp and block reductions, and the macro that instantiates one kernel body per storage dtype.
// Dimension names: T tokens (rows), C hidden (columns), V vocab, H heads, D head dim.
#pragma once

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef unsigned short bf16_bits;

struct __align__(2) bf16 { bf16_bits bits; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __uint_as_float(((unsigned int)v.bits) << 16); }

// Round to nearest even, as cvt.rn.bf16.f32 does on sm_80+; NaN stays NaN.
__device__ __forceinline__ bf16 float_to_bf16(float f)
{
    bf16 r;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
#else
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = 0x7fc0; return r; }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (bf16_bits)(u >> 16);
#endif
    return r;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) { return float_to_bf16(v); }

// Column sums over many rows (weight and bias gradients) in two passes, deterministic and spread over the whole GPU:
// pass 1 writes an fp32 partial per (chunk of COLUMN_CHUNK_ROWS rows, column), each chunk's rows added in order, on a
// grid of (column blocks, chunks); pass 2 adds each column's partials in chunk order. The CPU twins add in that order.
#define COLUMN_CHUNK_ROWS 64

__device__ __forceinline__ void column_chunks_sum(float* out, const float* partial, int chunks, int cols, int accumulate)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partial[(long long)k * cols + c];
    out[c] = accumulate ? out[c] + s : s;
}

template <typename T> __device__ __forceinline__ float load(const T* p, long long i) { return to_float(p[i]); }
template <typename T> __device__ __forceinline__ void store(T* p, long long i, float v) { p[i] = from_float<T>(v); }

// 16 bytes of a storage type (4 fp32 or 8 bf16) moved by one load or store instruction. The host launches a kernel
// that uses it only where every array is 16-byte aligned and the element count is a multiple of Packed128<T>::size.
template <typename T> struct __align__(16) Packed128
{
    static constexpr int size = 16 / sizeof(T);
    T v[size];
    __device__ __forceinline__ float get(int k) const { return to_float(v[k]); }
    __device__ __forceinline__ void set(int k, float x) { v[k] = from_float<T>(x); }
};
template <typename T> __device__ __forceinline__ Packed128<T> load128(const T* p, long long pack) { return reinterpret_cast<const Packed128<T>*>(p)[pack]; }
template <typename T> __device__ __forceinline__ void store128(T* p, long long pack, const Packed128<T>& x) { reinterpret_cast<Packed128<T>*>(p)[pack] = x; }

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. scratch: 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads(); // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// Grid-stride loop over n elements.
#define FOR_EACH(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// Instantiates `name##_f32` and `name##_bf16` as extern "C" kernels from one template body `name##_impl<T>`;
// `params` may name the storage type as T.
// `block` is the family's tunable block size (a -D define set by the host, which launches with the same value).
#define INSTANTIATE_F32_BF16(name, block, params, args)                                                           \
    namespace name##_as_f32 { typedef float T;                                                                    \
        extern "C" __global__ void __launch_bounds__(block) name##_f32 params { name##_impl<T> args; } }         \
    namespace name##_as_bf16 { typedef bf16 T;                                                                    \
        extern "C" __global__ void __launch_bounds__(block) name##_bf16 params { name##_impl<T> args; } }

