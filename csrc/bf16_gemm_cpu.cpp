// bf16 x bf16 -> fp32 GEMM with AVX512-BF16 (see bf16_gemm_cpu.h).
//
// vdpbf16ps adds to each of 16 fp32 lanes the dot product of one pair of bf16 values of each operand.
// The right operand is packed so that one 64-byte load holds, for 16 consecutive columns, the values of
// two consecutive k; the left operand's pair for a row is broadcast from its row (consecutive in
// memory). A register tile of MR rows x NP * 16 columns (24 accumulators) runs over a block of KC
// pairs of k, for which the packed panels (NP x 16 columns x 2 KC values = 32 KiB) stay in L1.
#include "bf16_gemm_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AEF_HAVE_X86 1
#endif

namespace autoregembed_fast {
namespace {

constexpr int MR = 6;                 // rows of a register tile
constexpr int NP = 4;                 // 16-column panels of a register tile
constexpr int64_t KC = 128;           // pairs of k per cache block
// Register tiles of rows in one parallel task, at most: 192 rows. When a task walks every column group,
// each of its row tasks streams the packed right operand once (the Jacobian's W: 56 MB), and 96 rows
// did so twice as often (G @ W 0.34 -> 0.30 s per call at 4,096 x 49,152 x 576); 288 rows were no
// faster (its rows' output, 0.66 MB at d = 576, then crowds a 1 MiB L2).
constexpr int64_t TILES_PER_TASK = 32;
// A left operand up to this size is read once per column group from cache (L2 / L3) rather than memory.
constexpr int64_t LEFT_IN_CACHE_BYTES = 8 * 1024 * 1024;

}  // namespace

// The CPU's features cannot change while the process runs: each is read once.
bool cpu_has_avx512_bf16() {
#ifdef AEF_HAVE_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#ifdef AEF_HAVE_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-bf16");
  }();
  return has;
#else
  return false;
#endif
}

namespace {

#ifdef AEF_HAVE_X86
// out[k * out_stride + j] = rows[j * stride + k] for 16 rows of 32-bit words, k in [0, 16): a 16 x 16
// transpose in registers (the head W read as W^T: each column's pair of bf16 values is one 32-bit
// word of a row of W; G^T in pairs of rows for the head's gradient).
__attribute__((target("avx512f"))) void transpose_16x16_words(const uint32_t* rows, int64_t stride,
                                                              uint32_t* out, int64_t out_stride) {
  __m512i r[16], t[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(rows + j * stride);
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4) {
    r[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]);
    r[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
    r[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
    r[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
  }
  // r[4q + i] now holds, in each 128-bit lane L, words k = 4L + i of rows 4q .. 4q + 3.
  for (int i = 0; i < 4; ++i) {
    const __m512i a = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);       // lanes 0, 2 | 0, 2
    const __m512i b = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);       // lanes 1, 3 | 1, 3
    const __m512i c = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
    _mm512_storeu_si512(out + (0 + i) * out_stride, _mm512_shuffle_i32x4(a, c, 0x88));
    _mm512_storeu_si512(out + (8 + i) * out_stride, _mm512_shuffle_i32x4(a, c, 0xdd));
    _mm512_storeu_si512(out + (4 + i) * out_stride, _mm512_shuffle_i32x4(b, d, 0x88));
    _mm512_storeu_si512(out + (12 + i) * out_stride, _mm512_shuffle_i32x4(b, d, 0xdd));
  }
}

// out[2j + t] = (t ? second : first)[j] for 16 bf16 values of two rows: one k pair of a panel.
__attribute__((target("avx2"))) void interleave_16_pairs(const uint16_t* first, const uint16_t* second,
                                                         uint16_t* out) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first));
  const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second));
  const __m256i low = _mm256_unpacklo_epi16(x, y);   // pairs 0-3 | 8-11
  const __m256i high = _mm256_unpackhi_epi16(x, y);  // pairs 4-7 | 12-15
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(low, high, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                      _mm256_permute2x128_si256(low, high, 0x31));
}

// dst[j][i .. i + 31] = src[i .. i + 31][j] for 16 columns j of 32 rows i of src: the 16 values of
// each pair of rows interleaved into 32-bit words (row 2p low, 2p + 1 high: one k pair of a left
// operand), then the 16 x 16 words transposed.
__attribute__((target("avx512f"))) void transpose_32x16(const uint16_t* src, int64_t ld_src,
                                                       uint16_t* dst, int64_t ld_dst) {
  alignas(64) uint32_t words[16 * 16];
  for (int p = 0; p < 16; ++p) {
    interleave_16_pairs(src + 2 * p * ld_src, src + (2 * p + 1) * ld_src,
                        reinterpret_cast<uint16_t*>(words + 16 * p));
  }
  transpose_16x16_words(words, 16, reinterpret_cast<uint32_t*>(dst), ld_dst / 2);
}

__attribute__((target("avx512f,avx512bf16"))) void round_32_to_bf16(const float* src, uint16_t* dst) {
  // cvtne2ps_pbh(a, b): b's 16 values in the low half, a's in the high half.
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16),
                                                        _mm512_loadu_ps(src)));
}
#endif

// One 16-column panel of the packed operand: out[k][j][t] = b[2k + t][n0 + j], zeros past K and N.
void pack_panel(const uint16_t* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t n0,
                int64_t pairs, uint16_t* out) {
  const int64_t full_pairs = K / 2;
  int64_t done = 0;  // pairs packed by a fast path
#ifdef AEF_HAVE_X86
  if (n0 + 16 <= N && sk == 1 && sn % 2 == 0) {
    // b = a row-major W [N, K] read transposed, rows 32-bit aligned: 16 x 16 word transposes.
    const uint32_t* rows = reinterpret_cast<const uint32_t*>(src + n0 * sn);
    for (; done + 16 <= full_pairs; done += 16) {
      transpose_16x16_words(rows + done, sn / 2, reinterpret_cast<uint32_t*>(out + done * 32), 16);
    }
  }
#endif
  for (int64_t k = done; k < pairs; ++k) {
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t n = n0 + j;
      const bool second = 2 * k + 1 < K;
      out[k * 32 + 2 * j] = n < N ? src[2 * k * sk + n * sn] : uint16_t(0);
      out[k * 32 + 2 * j + 1] = n < N && second ? src[(2 * k + 1) * sk + n * sn] : uint16_t(0);
    }
  }
}

}  // namespace

at::Tensor pack_bf16_right_operand(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kBFloat16,
              "pack_bf16_right_operand: expected a 2-D bf16 tensor");
  // The fast paths use AVX2 / AVX-512 instructions, which every AVX512-BF16 CPU has.
  TORCH_CHECK(cpu_has_avx512_bf16(), "pack_bf16_right_operand: this CPU has no AVX512-BF16");
  const int64_t K = b.size(0), N = b.size(1);
  const int64_t pairs = (K + 1) / 2;
  const int64_t panels = (N + 16 * NP - 1) / (16 * NP) * NP;
  at::Tensor packed = at::empty({panels, pairs, 16, 2}, b.options().memory_format(at::MemoryFormat::Contiguous));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  const int64_t sk = b.stride(0), sn = b.stride(1);
#ifdef AEF_HAVE_X86
  if (sn == 1 && K % 2 == 0) {
    // b row-major (the head W itself): for each pair of rows, read once and in order, interleave
    // 16 consecutive values of the two rows into every full panel; the last partial panel by value.
    const int64_t full_panels = N / 16;
    at::parallel_for(0, pairs, 64, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const uint16_t* first = src + 2 * k * sk;
        for (int64_t p = 0; p < full_panels; ++p) {
          interleave_16_pairs(first + 16 * p, first + sk + 16 * p, dst + (p * pairs + k) * 32);
        }
        for (int64_t p = full_panels; p < panels; ++p) {
          uint16_t* out = dst + (p * pairs + k) * 32;
          for (int64_t j = 0; j < 16; ++j) {
            const int64_t n = 16 * p + j;
            out[2 * j] = n < N ? first[n] : uint16_t(0);
            out[2 * j + 1] = n < N ? first[sk + n] : uint16_t(0);
          }
        }
      }
    });
    return packed;
  }
#endif
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_panel(src, sk, sn, K, N, 16 * p, pairs, dst + p * pairs * 32);
  });
  return packed;
}

void round_to_bf16(const float* src, int64_t n, at::BFloat16* dst) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
#ifdef AEF_HAVE_X86
  for (; i + 32 <= n; i += 32) round_32_to_bf16(src + i, out + i);
#endif
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

void transpose_bf16(const at::BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src,
                    at::BFloat16* dst, int64_t ld_dst) {
  TORCH_CHECK(ld_dst % 2 == 0 && ld_dst >= rows + rows % 2,
              "transpose_bf16: the destination rows must be even and hold the padded width");
  const uint16_t* in = reinterpret_cast<const uint16_t*>(src);
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  const int64_t padded_rows = rows + rows % 2;
  const bool wide = cpu_has_avx512_bf16();  // the 32 x 16 tiles need AVX-512, which such CPUs have
  // A task is a run of 16 source columns (16 destination rows), written in full.
  at::parallel_for(0, (cols + 15) / 16, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t j0 = 16 * task, j1 = std::min(cols, j0 + 16);
      int64_t i = 0;
#ifdef AEF_HAVE_X86
      if (wide && j1 - j0 == 16) {
        for (; i + 32 <= rows; i += 32) {
          transpose_32x16(in + i * ld_src + j0, ld_src, out + j0 * ld_dst + i, ld_dst);
        }
      }
#endif
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t r = i; r < padded_rows; ++r) {
          out[j * ld_dst + r] = r < rows ? in[r * ld_src + j] : uint16_t(0);
        }
      }
    }
  });
}

#ifdef AEF_HAVE_X86
namespace {

// One register tile: ROWS (<= MR) rows x NP * 16 columns over pairs [k_begin, k_end). c holds `cols`
// (<= NP * 16) valid columns; init: load c (load_c), else bias (when given), else 0.
template <int ROWS>
__attribute__((target("avx512f,avx512bf16"))) void tile(
    const uint16_t* a, int64_t lda, const uint16_t* b, int64_t panel_stride, int64_t k_begin,
    int64_t k_end, float* c, int64_t ldc, int64_t cols, bool load_c, const float* bias) {
  __mmask16 masks[NP];
  for (int p = 0; p < NP; ++p) {
    const int64_t valid = std::clamp<int64_t>(cols - 16 * p, 0, 16);
    masks[p] = static_cast<__mmask16>((uint32_t(1) << valid) - 1);
  }
  __m512 acc[ROWS][NP];
  for (int r = 0; r < ROWS; ++r) {
    for (int p = 0; p < NP; ++p) {
      if (load_c) {
        acc[r][p] = _mm512_maskz_loadu_ps(masks[p], c + r * ldc + 16 * p);
      } else if (bias != nullptr) {
        acc[r][p] = _mm512_maskz_loadu_ps(masks[p], bias + 16 * p);
      } else {
        acc[r][p] = _mm512_setzero_ps();
      }
    }
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    __m512bh right[NP];
    for (int p = 0; p < NP; ++p) {
      right[p] = (__m512bh)_mm512_loadu_si512(b + p * panel_stride + k * 32);
    }
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * k, sizeof(pair));
      const __m512bh left = (__m512bh)_mm512_set1_epi32(pair);
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], left, right[p]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int p = 0; p < NP; ++p) _mm512_mask_storeu_ps(c + r * ldc + 16 * p, masks[p], acc[r][p]);
  }
}

// Prefetches `rows` rows of `cols` fp32 values (row stride ld) into L1.
void prefetch_rows(const float* c, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; j += 16) __builtin_prefetch(c + i * ld + j, 0, 3);
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t,
                        float*, int64_t, int64_t, bool, const float*);
constexpr TileFn TILES[MR + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

}  // namespace
#endif

void bf16_gemm(const at::BFloat16* a, int64_t lda, const at::Tensor& packed_b, int64_t M, int64_t N,
               int64_t K, float* c, int64_t ldc, bool accumulate, const float* bias) {
#ifdef AEF_HAVE_X86
  TORCH_CHECK(K > 0 && K % 2 == 0, "bf16_gemm: K must be positive and even (pad with a zero column)");
  TORCH_CHECK(packed_b.size(1) == K / 2 && packed_b.size(0) * 16 >= N,
              "bf16_gemm: the packed operand does not match K and N");
  const uint16_t* left = reinterpret_cast<const uint16_t*>(a);
  const uint16_t* right = reinterpret_cast<const uint16_t*>(packed_b.data_ptr<at::BFloat16>());
  const int64_t pairs = K / 2;
  const int64_t panel_stride = pairs * 32;
  const int64_t groups = (N + 16 * NP - 1) / (16 * NP);
  const int64_t threads = at::get_num_threads();
  // A task is a range of rows (whole register tiles, spread evenly) and of column groups. When the
  // left operand does not stay in cache (the Jacobian's G [C, V], the head gradient's G^T [V, C]), a
  // task walks every group for each cache block of k, so that the block of left rows, read from
  // memory once, serves them all from cache (one group per task read the rows once per group: ~5x
  // the traffic at d = 576); its row tasks are then a multiple of the threads, so that each thread
  // gets the same rows (at::parallel_for hands a thread a contiguous run of tasks: at 341 rows, the
  // op's bf16 block, 12 tasks of rows 96 / 96 / 96 / 53 x groups 0-3 / 4-7 / 8 over 2 threads had
  // given one thread 2.3x the other's work).
  // Otherwise (the logits' H [C, d]) a task is one group, whose panels serve every row task in turn
  // from L2 while the left rows come from cache (walking the groups there streamed the 56 MB of
  // packed W^T once per row task: 20 % slower at 4,096 x 576 x 49,152).
  const int64_t tiles = (M + MR - 1) / MR;
  const bool walk_groups = M * K * 2 > LEFT_IN_CACHE_BYTES;
  const int64_t row_tasks =
      walk_groups ? std::min(tiles, threads * ((tiles + threads * TILES_PER_TASK - 1) /
                                               (threads * TILES_PER_TASK)))
                  : (tiles + TILES_PER_TASK - 1) / TILES_PER_TASK;
  const int64_t group_tasks = walk_groups ? 1 : groups;
  // Tasks in column-group-major order: a thread's consecutive tasks share their packed panels.
  at::parallel_for(0, group_tasks * row_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t group_task = task / row_tasks, row_task = task % row_tasks;
      const int64_t group_begin = group_task * groups / group_tasks;
      const int64_t group_end = (group_task + 1) * groups / group_tasks;
      const int64_t row_begin = row_task * tiles / row_tasks * MR;
      const int64_t row_end = std::min(M, (row_task + 1) * tiles / row_tasks * MR);
      for (int64_t k0 = 0; k0 < pairs; k0 += KC) {
        const int64_t k1 = std::min(pairs, k0 + KC);
        const bool load_c = accumulate || k0 > 0;
        for (int64_t group = group_begin; group < group_end; ++group) {
          const int64_t col = group * 16 * NP;
          const int64_t cols = std::min<int64_t>(16 * NP, N - col);
          const uint16_t* panels = right + group * NP * panel_stride;
          const float* init = (!load_c && bias != nullptr) ? bias + col : nullptr;
          for (int64_t r = row_begin; r < row_end; r += MR) {
            const int rows = static_cast<int>(std::min<int64_t>(MR, row_end - r));
            // An accumulated c (the head gradient's, summed over blocks of tokens) comes from
            // memory: fetching the next tile's rows during this tile hides that (dW GEMM 0.41 ->
            // 0.29 s at 49,152 x 576 x 341 x 12 blocks).
            if (load_c && r + MR < row_end) {
              prefetch_rows(c + (r + MR) * ldc + col, ldc, std::min<int64_t>(MR, row_end - r - MR),
                            cols);
            }
            TILES[rows](left + r * lda, lda, panels, panel_stride, k0, k1, c + r * ldc + col, ldc,
                        cols, load_c, init);
          }
        }
      }
    }
  });
#else
  TORCH_CHECK(false, "bf16_gemm needs an x86-64 CPU with AVX512-BF16");
#endif
}

at::Tensor bf16_matmul_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "bf16_matmul_cpu: this CPU has no AVX512-BF16");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                  a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
              "bf16_matmul_cpu: expected bf16 a [M, K] and b [K, N]");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const at::Tensor left = K % 2 ? at::constant_pad_nd(a, {0, 1}) : a.contiguous();
  bf16_gemm(left.data_ptr<at::BFloat16>(), left.size(1), pack_bf16_right_operand(b), M, N,
            left.size(1), out.data_ptr<float>(), N, false, nullptr);
  return out;
}

}  // namespace autoregembed_fast
