// bf16 x bf16 -> fp32 GEMM for the CPU backend on CPUs with AVX512-BF16 (vdpbf16ps), where torch
// offers none: its bf16 GEMMs round their output to bf16 and its bf16 -> fp32 entry points run at fp32
// speed without AMX (NOTES.md, issue 25). Products are exact in fp32 and accumulate in fp32.
#pragma once

#include <torch/extension.h>

namespace autoregembed_fast {

// True when this CPU executes AVX512-BF16 dot products; bf16_gemm must not run elsewhere.
bool cpu_has_avx512_bf16();
// Intel AMX with bf16 tiles (Sapphire Rapids and later): torch's own bf16 GEMMs run at bf16 speed there.
bool cpu_has_amx_bf16();

// b [K, N] bf16 (any 2-D strides) packed for bf16_gemm's right operand: [P, ceil(K/2), 16, 2] with P a
// multiple of the kernel's panel group, b[2k + t][16p + j] at [p][k][j][t] and zeros beyond K and N.
at::Tensor pack_bf16_right_operand(const at::Tensor& b);

// dst[i] = bf16(src[i]) for i < n, rounded to nearest even (denormals may become 0: the CPU's
// conversion flushes them).
// Only on CPUs with AVX512-BF16 (the caller checks: this runs per slice of a row).
void round_to_bf16(const float* src, int64_t n, at::BFloat16* dst);

// dst[j][i] = src[i][j] for i < rows, j < cols, and dst[j][rows] = 0 when rows is odd: src^T as
// bf16_gemm's left operand (K = rows rounded up to even). Row strides ld_src and ld_dst (ld_dst even,
// >= the padded rows).
void transpose_bf16(const at::BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src,
                    at::BFloat16* dst, int64_t ld_dst);

// c[M, N] (fp32, row stride ldc) = init + a @ b, with a [M, K] bf16 (row stride lda, K even: pad an
// odd K with a zero column) and b given packed (pack_bf16_right_operand of b [K, N]). init is c itself
// when accumulate, else bias[N] (fp32) when given, else 0. Threads split the output tiles.
void bf16_gemm(const at::BFloat16* a, int64_t lda, const at::Tensor& packed_b, int64_t M, int64_t N,
               int64_t K, float* c, int64_t ldc, bool accumulate, const float* bias);

// a [M, K] @ b [K, N], bf16 inputs (any strides), fp32 output, through bf16_gemm (needs AVX512-BF16):
// the bench's floor for bf16 inputs, and a handle for testing the GEMM on its own.
at::Tensor bf16_matmul_cpu(const at::Tensor& a, const at::Tensor& b);

}  // namespace autoregembed_fast
