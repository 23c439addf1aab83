// Tensor-core helpers shared by the attention families (attention_mma.cu, attention_flash.cu): bf16 pair packing,
// mma.sync m16n8k16, ldmatrix, cp.async, and the packed-sequence lookup of a tile.
#pragma once
#include "common.cuh"

__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi)
{
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); // first source goes to the upper half
    return r;
}

__device__ __forceinline__ unsigned int pack_bits(bf16 lo, bf16 hi) { return (unsigned int)lo.bits | ((unsigned int)hi.bits << 16); }

// D (16x8 fp32) += A (16x16 bf16, row) * B (16x8 bf16, col)
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ int find_sequence(const int* offsets, int count, int x)
{
    int lo = 0, hi = count;
    while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (offsets[mid] <= x) lo = mid; else hi = mid; }
    return lo;
}

// Shared-memory address of a generic pointer (what ldmatrix and cp.async take).
__device__ __forceinline__ unsigned int shared_address(const void* p)
{
    unsigned int r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// Four 8x8 bf16 matrices: lanes 8i..8i+7 give the row addresses of matrix i; register i receives matrix i in the
// mma fragment layout (thread l: row l / 4, columns 2 (l % 4), +1). .trans gives the transposed matrices.
__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, unsigned int address)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int* r, unsigned int address)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
}

// Two matrices: lanes 0-7 and 8-15 give the row addresses (the other lanes' addresses are ignored).
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned int* r, unsigned int address)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
}

// 16 bytes global -> shared without passing through registers; src_bytes 0 fills the 16 bytes with zeros (rows past
// a sequence's end) and reads nothing.
__device__ __forceinline__ void cp_async16(void* shared, const void* global, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(shared_address(shared)), "l"(global), "r"(valid ? 16 : 0) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
