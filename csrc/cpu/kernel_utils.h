// Building blocks of the CPU attention kernels (block-sparse attention, block scoring): the exp2 approximation,
// row-major GEMMs through torch's BLAS or vectorized loops, the causal rule on a score tile and the online-softmax
// update. Everything here is internal to one translation unit (anonymous namespace).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// Fortran BLAS sgemm (column-major, LP64), exported by torch's CPU library when it is built with a BLAS.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// Hot loops get AVX-512 / AVX2 clones picked at load time (the extension is built for the baseline ISA).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSE_ATTN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPARSE_ATTN_ISA_CLONES
#endif

namespace sparse_attn {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The polynomial of 2^f on [-1/2, 1/2], highest degree first (Horner).
constexpr float kExp2Poly[7] = {1.5403530393381609e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                                5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};

// 2^x for x <= 0 (and -inf -> 0, NaN -> NaN, so that a NaN score poisons its row as in torch): x = k + f with k = round(x),
// f in [-1/2, 1/2]; 2^f by its degree-6 Taylor polynomial, 2^k through the exponent bits: relative error 2.5e-7
// (a few ulps) over [-126, 0]. The shifter rounding needs IEEE evaluation order (the build uses no -ffast-math).
// Always inlined: a call would keep the loops that use it from being vectorized.
inline __attribute__((always_inline)) float exp2_nonpositive(float x) {
  const float xc = x > -126.0f ? x : -126.0f;
  const float k = (xc + 12582912.0f) - 12582912.0f;  // round to nearest via the 1.5 * 2^23 shifter
  const float f = xc - k;
  float p = kExp2Poly[0];
#pragma GCC unroll 7
  for (int i = 1; i < 7; ++i) p = p * f + kExp2Poly[i];
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return x < -126.0f ? 0.0f : (x != x ? x : p * scale);
}

// The rows of a B operand: row j at base + j * ld, or at ptrs[j] (keys and values read in place from scattered
// cache pages, one pointer per key).
struct RowsOf {
  const float* base = nullptr;
  int64_t ld = 0;
  const float* const* ptrs = nullptr;
  RowsOf(const float* b, int64_t l) : base(b), ld(l) {}
  explicit RowsOf(const float* const* p) : ptrs(p) {}
  const float* operator[](int64_t j) const { return ptrs ? ptrs[j] : base + j * ld; }
};

// C[M, N] = A[M, K] B[N, K]^T, row-major with leading dimensions. Four rows of A share each load of a B row; a last
// group of fewer rows repeats its last row (computed, not stored), so decode's 1-3 rows per KV head read B once.
SPARSE_ATTN_ISA_CLONES
void gemm_abt_loops(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; i += 4) {
    const int64_t live = std::min<int64_t>(4, m - i);
    const float* a0 = a + i * lda;
    const float* a1 = live > 1 ? a0 + lda : a0;
    const float* a2 = live > 2 ? a0 + 2 * lda : a1;
    const float* a3 = live > 3 ? a0 + 3 * lda : a2;
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) {
      const float* bj = b[j];
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t e = 0; e < k; ++e) {
        d0 += a0[e] * bj[e];
        d1 += a1[e] * bj[e];
        d2 += a2[e] * bj[e];
        d3 += a3[e] * bj[e];
      }
      ci[j] = d0;
      if (live > 1) ci[ldc + j] = d1;
      if (live > 2) ci[2 * ldc + j] = d2;
      if (live > 3) ci[3 * ldc + j] = d3;
    }
  }
}

// Sum of the 16 lanes of x, as a tree (log2 16 vector steps, not 15 dependent scalar additions).
inline __attribute__((always_inline)) float lane_sum16(float* x) {
  for (int w = 8; w > 0; w /= 2) {
#pragma omp simd
    for (int l = 0; l < w; ++l) x[l] += x[l + w];
  }
  return x[0];
}

// Calls f(std::integral_constant<int, R>{}) for R = rows in [1, Max]: register tiles need their row count at
// compile time.
template <int Max, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (Max > 1) {
    if (rows < Max) return with_rows<Max - 1>(rows, f);
  }
  f(std::integral_constant<int, Max>{});
}

// Calls f(std::integral_constant<int, R>{}, i) for ceil(m / Max) consecutive groups of rows starting at row i, of
// sizes that differ by at most one (32 rows in groups of at most 6: 6, 6, 5, 5, 5, 5, not five of 6 and one of 2):
// a small remainder group would leave most of the register tile idle. Each row's arithmetic does not depend on its
// group.
template <int Max, typename F>
inline void for_row_groups(int64_t m, F&& f) {
  const int64_t groups = (m + Max - 1) / Max, base = groups ? m / groups : 0, extra = groups ? m % groups : 0;
  for (int64_t g = 0, i = 0; g < groups; ++g) {
    const int64_t size = base + (g < extra ? 1 : 0);
    with_rows<Max>(size, [&](auto rows) { f(rows, i); });
    i += size;
  }
}

// The rows of the tall products' A operand as row panels: the m rows (row r at rows + r * lda, k 32-bit values)
// are cut into the groups of for_row_groups<12>, and the group of R rows starting at row i is stored at
// panels + i * k with value e of its row r at e * R + r. The register tiles then read a group's values at fixed
// offsets from one pointer (row pointers of their own would take more general registers than there are).
template <typename W>
inline void to_row_panels(const W* rows, int64_t lda, int64_t m, int64_t k, W* panels) {
  for_row_groups<12>(m, [&](auto group, int64_t i) {
    constexpr int R = decltype(group)::value;
    for (int r = 0; r < R; ++r) {
      for (int64_t e = 0; e < k; ++e) panels[i * k + e * R + r] = rows[(i + r) * lda + e];
    }
  });
}

// The vector extensions the kernels may use: what the CPU has, capped by the environment variable
// SPARSE_ATTN_CPU_ISA ("avx2": no AVX-512 paths; "baseline": neither AVX-512 nor AVX2 paths), read once per process,
// so one machine can run (and test) the paths of an older CPU.
enum class IsaLevel { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
inline IsaLevel isa_cap() {
  static const IsaLevel cap = [] {
    const char* env = std::getenv("SPARSE_ATTN_CPU_ISA");
    if (env == nullptr || *env == '\0') return IsaLevel::kAvx512;
    const std::string value(env);
    if (value == "avx2") return IsaLevel::kAvx2;
    if (value == "baseline") return IsaLevel::kBaseline;
    return IsaLevel::kAvx512;  // "avx512", "native" or anything else: no cap
  }();
  return cap;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SPARSE_ATTN_AVX512 __attribute__((target("avx512f")))
inline bool has_avx512() {
  static const bool yes = isa_cap() >= IsaLevel::kAvx512 && __builtin_cpu_supports("avx512f");
  return yes;
}

#define SPARSE_ATTN_AVX2 __attribute__((target("avx2,fma")))
inline bool has_avx2() {
  static const bool yes =
      isa_cap() >= IsaLevel::kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// The sum of an 8-lane vector's lanes.
SPARSE_ATTN_AVX2 inline float sum8_avx2(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// exp2_nonpositive on 8 lanes: the same operations in the same order (clamp, shifter rounding, Horner with fused
// multiply-adds, the exponent bits), so the same values; x < -126 gives 0 and NaN stays NaN. The compiler does not
// vectorize the scalar form inside the softmax's row loop (its selects become branches), so that loop uses this.
SPARSE_ATTN_AVX2 inline __m256 exp2_nonpositive8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f), shifter = _mm256_set1_ps(12582912.0f);
  const __m256 xc = _mm256_blendv_ps(lo, x, _mm256_cmp_ps(x, lo, _CMP_GT_OQ));  // NaN -> -126, as the scalar form
  const __m256 k = _mm256_sub_ps(_mm256_add_ps(xc, shifter), shifter);
  const __m256 f = _mm256_sub_ps(xc, k);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), r);
}

// row[c] = 2^(row[c] - m) for c < n8 (a multiple of 8), in place; returns their sum.
SPARSE_ATTN_AVX2 inline float exp2_row_avx2(float* row, int64_t n8, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t c = 0; c < n8; c += 8) {
    const __m256 p = exp2_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(row + c), mv));
    _mm256_storeu_ps(row + c, p);
    sum = _mm256_add_ps(sum, p);
  }
  return sum8_avx2(sum);
}

// Dot products of short query rows with 16 rows at once, on AVX-512 (decode's scores against keys or labels).
//
// A dot product of 16-lane partial sums needs a horizontal sum per (query row, key); done one at a time that is a
// chain of shuffles per key. Here four keys' partial-sum vectors x0..x3 are reduced together, then four such results:
//   sum4:     per 128-bit lane group L: [x0, x1, x2, x3 summed over L's 4 lanes]        (2 unpacks + add, twice)
//   combine4: from four sum4 results y0..y3 (keys 4i..4i+3 in y_i), lane group i = [y_i summed over groups]
// so the 16 dot products of a query row cost 15 shuffle-add steps in all, and land as one vector, key j in lane j.
SPARSE_ATTN_AVX512 inline __m512 sum4(__m512 x0, __m512 x1, __m512 x2, __m512 x3) {
  // Per lane group: [x0_0 + x0_2, x1_0 + x1_2, x0_1 + x0_3, x1_1 + x1_3], and the same for x2, x3.
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(x0, x1), _mm512_unpackhi_ps(x0, x1));
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(x2, x3), _mm512_unpackhi_ps(x2, x3));
  const __m512d ad = _mm512_castps_pd(a), bd = _mm512_castps_pd(b);
  // [a_0, a_1, b_0, b_1] + [a_2, a_3, b_2, b_3] = [x0, x1, x2, x3] summed over the group.
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ad, bd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ad, bd)));
}

SPARSE_ATTN_AVX512 inline __m512 combine4(__m512 y0, __m512 y1, __m512 y2, __m512 y3) {
  constexpr int kEven = (2 << 6) | (0 << 4) | (2 << 2) | 0, kOdd = (3 << 6) | (1 << 4) | (3 << 2) | 1;
  // [y0 groups 0+1, y0 groups 2+3, y1 groups 0+1, y1 groups 2+3], and the same for y2, y3.
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, kEven), _mm512_shuffle_f32x4(y0, y1, kOdd));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y2, y3, kEven), _mm512_shuffle_f32x4(y2, y3, kOdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, kEven), _mm512_shuffle_f32x4(s01, s23, kOdd));
}

// out[i] lane j = a_i . rows[j] for the M rows a_i = a + i * lda, k channels (a multiple of 16).
template <int M>
SPARSE_ATTN_AVX512 inline void dots16(const float* a, int64_t lda, int64_t k, const float* const* rows, __m512* out) {
  __m512 quad[M][4];
  for (int g = 0; g < 4; ++g) {
    const float* r0 = rows[4 * g];
    const float* r1 = rows[4 * g + 1];
    const float* r2 = rows[4 * g + 2];
    const float* r3 = rows[4 * g + 3];
    __m512 d[M][4];
    for (int i = 0; i < M; ++i) d[i][0] = d[i][1] = d[i][2] = d[i][3] = _mm512_setzero_ps();
    for (int64_t e = 0; e < k; e += 16) {
      const __m512 y0 = _mm512_loadu_ps(r0 + e), y1 = _mm512_loadu_ps(r1 + e), y2 = _mm512_loadu_ps(r2 + e),
                   y3 = _mm512_loadu_ps(r3 + e);
      for (int i = 0; i < M; ++i) {
        const __m512 x = _mm512_loadu_ps(a + i * lda + e);
        d[i][0] = _mm512_fmadd_ps(x, y0, d[i][0]);
        d[i][1] = _mm512_fmadd_ps(x, y1, d[i][1]);
        d[i][2] = _mm512_fmadd_ps(x, y2, d[i][2]);
        d[i][3] = _mm512_fmadd_ps(x, y3, d[i][3]);
      }
    }
    for (int i = 0; i < M; ++i) quad[i][g] = sum4(d[i][0], d[i][1], d[i][2], d[i][3]);
  }
  for (int i = 0; i < M; ++i) out[i] = combine4(quad[i][0], quad[i][1], quad[i][2], quad[i][3]);
}

// Issues prefetches for the `bytes` bytes at p.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* at = static_cast<const char*>(p);
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(at + byte, 0, 3);
}
#endif

// Loads one float of every 64-byte line of the n floats at p and returns their sum: brings a run of memory through
// the caches as one sequential stream, which the hardware prefetchers follow at full bandwidth.
inline float touch_lines(const float* p, int64_t n) {
  float sum = 0.0f;
  for (int64_t e = 0; e < n; e += 16) sum += p[e];
  return sum;
}

// C[M, N] = A[M, K] B[N, K]^T for short A (M <= 4: decode's heads of one KV group) and K a multiple of 16: each B
// row is loaded once for all rows, dot products are kept as 16 lanes and summed as trees. Decode reads B (the keys)
// from scattered pages, so the rows `lookahead` keys ahead are prefetched.
SPARSE_ATTN_ISA_CLONES
void gemm_abt_short(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c, int64_t ldc) {
  constexpr int64_t kLookahead = 8;
  const float* a0 = a;
  const float* a1 = m > 1 ? a0 + lda : a0;
  const float* a2 = m > 2 ? a0 + 2 * lda : a1;
  const float* a3 = m > 3 ? a0 + 3 * lda : a2;
  for (int64_t j = 0; j < n; ++j) {
    if (j + kLookahead < n) {
      const char* ahead = reinterpret_cast<const char*>(b[j + kLookahead]);
      for (int64_t byte = 0; byte < k * 4; byte += 64) __builtin_prefetch(ahead + byte, 0, 3);
    }
    const float* bj = b[j];
    alignas(64) float d0[16] = {}, d1[16] = {}, d2[16] = {}, d3[16] = {};
    for (int64_t e0 = 0; e0 < k; e0 += 16) {
#pragma omp simd
      for (int64_t l = 0; l < 16; ++l) {
        const float y = bj[e0 + l];
        d0[l] += a0[e0 + l] * y;
        d1[l] += a1[e0 + l] * y;
        d2[l] += a2[e0 + l] * y;
        d3[l] += a3[e0 + l] * y;
      }
    }
    c[j] = lane_sum16(d0);
    if (m > 1) c[ldc + j] = lane_sum16(d1);
    if (m > 2) c[2 * ldc + j] = lane_sum16(d2);
    if (m > 3) c[3 * ldc + j] = lane_sum16(d3);
  }
}

// C[M, N] += A[M, K] B[K, N], row-major with leading dimensions, for short A (M <= 4: decode's heads of one KV
// group): strips of 64 columns of C stay in registers over the whole K loop, so each B row is loaded once per strip
// and C is read and written once.
SPARSE_ATTN_ISA_CLONES
void gemm_ab_acc_short(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
                       int64_t ldc) {
  constexpr int64_t kStrip = 64;
  for (int64_t j0 = 0; j0 < n; j0 += kStrip) {
    const int64_t w = std::min(kStrip, n - j0);
    float r0[kStrip] = {}, r1[kStrip] = {}, r2[kStrip] = {}, r3[kStrip] = {};
    for (int64_t p = 0; p < k; ++p) {
      if (j0 == 0 && p + 8 < k) {  // B rows come from scattered pages in decode: fetch them ahead
        const char* ahead = reinterpret_cast<const char*>(b[p + 8]);
        for (int64_t byte = 0; byte < n * 4; byte += 64) __builtin_prefetch(ahead + byte, 0, 3);
      }
      const float* bp = b[p] + j0;
      const float x0 = a[p], x1 = m > 1 ? a[lda + p] : 0.0f, x2 = m > 2 ? a[2 * lda + p] : 0.0f,
                  x3 = m > 3 ? a[3 * lda + p] : 0.0f;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const float y = bp[j];
        r0[j] += x0 * y;
        r1[j] += x1 * y;
        r2[j] += x2 * y;
        r3[j] += x3 * y;
      }
    }
    float* rows[4] = {r0, r1, r2, r3};
    for (int64_t i = 0; i < m; ++i) {
      float* ci = c + i * ldc + j0;
      for (int64_t j = 0; j < w; ++j) ci[j] += rows[i][j];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// gemm_abt_short on AVX-512: 16 keys at a time through dots16, their scores stored as one vector per row. The next
// 16 keys are prefetched meanwhile (decode reads them from scattered pages).
template <int M>
SPARSE_ATTN_AVX512 void gemm_abt_short_avx512(int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
                                              int64_t ldc) {
  constexpr int64_t kLookahead = 16;
  const float* rows[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, n - j0);
    for (int64_t t = 0; t < 16; ++t) rows[t] = b[j0 + (t < w ? t : 0)];  // lanes past n repeat a key, not stored
    for (int64_t j = j0 + kLookahead; j < std::min(n, j0 + kLookahead + 16); ++j) prefetch_bytes(b[j], 4 * k);
    __m512 out[M];
    dots16<M>(a, lda, k, rows, out);
    const __mmask16 keep = static_cast<__mmask16>((1u << w) - 1);
    for (int i = 0; i < M; ++i) _mm512_mask_storeu_ps(c + i * ldc + j0, keep, out[i]);
  }
}

// gemm_ab_acc_short on AVX-512: a strip of up to 64 columns of each of the M rows of C stays in registers over the
// whole K loop (one broadcast of A per row and key, one load of the B row's strip per key). LDA > 0: A's leading
// dimension is that constant (lda is ignored), so A's rows are read at fixed offsets from one pointer instead of M
// row pointers of their own (which take more general registers than there are).
template <int M, int64_t LDA = 0>
SPARSE_ATTN_AVX512 void gemm_ab_acc_short_avx512(int64_t n, int64_t k, const float* a, int64_t lda_, RowsOf b,
                                                 float* c, int64_t ldc) {
  constexpr int64_t kLookahead = 16;
  const int64_t lda = LDA > 0 ? LDA : lda_;
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t w = std::min<int64_t>(64, n - j0), vecs = (w + 15) / 16;
    __mmask16 lanes[4];
    for (int64_t v = 0; v < 4; ++v) {
      const int64_t live = std::clamp<int64_t>(w - 16 * v, 0, 16);
      lanes[v] = static_cast<__mmask16>((1u << live) - 1);
    }
    __m512 acc[M][4];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    if (vecs == 4 && lanes[3] == 0xFFFF) {
      for (int64_t p = 0; p < k; ++p) {
        if (j0 == 0 && p + kLookahead < k) prefetch_bytes(b[p + kLookahead], 4 * n);
        const float* bp = b[p] + j0;
        const __m512 y0 = _mm512_loadu_ps(bp), y1 = _mm512_loadu_ps(bp + 16), y2 = _mm512_loadu_ps(bp + 32),
                     y3 = _mm512_loadu_ps(bp + 48);
        for (int i = 0; i < M; ++i) {
          const __m512 x = _mm512_set1_ps(a[i * lda + p]);
          acc[i][0] = _mm512_fmadd_ps(x, y0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(x, y1, acc[i][1]);
          acc[i][2] = _mm512_fmadd_ps(x, y2, acc[i][2]);
          acc[i][3] = _mm512_fmadd_ps(x, y3, acc[i][3]);
        }
      }
    } else {  // a partial strip: masked loads (lanes past the row are neither read nor written)
      for (int64_t p = 0; p < k; ++p) {
        if (j0 == 0 && p + kLookahead < k) prefetch_bytes(b[p + kLookahead], 4 * n);
        const float* bp = b[p] + j0;
        __m512 y[4];
        for (int64_t v = 0; v < 4; ++v) y[v] = _mm512_maskz_loadu_ps(lanes[v], bp + 16 * v);
        for (int i = 0; i < M; ++i) {
          const __m512 x = _mm512_set1_ps(a[i * lda + p]);
          for (int64_t v = 0; v < 4; ++v) acc[i][v] = _mm512_fmadd_ps(x, y[v], acc[i][v]);
        }
      }
    }
    for (int i = 0; i < M; ++i) {
      float* ci = c + i * ldc + j0;
      for (int64_t v = 0; v < vecs; ++v) {
        const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes[v], ci + 16 * v), acc[i][v]);
        _mm512_mask_storeu_ps(ci + 16 * v, lanes[v], sum);
      }
    }
  }
}

// The short products on AVX2 (8 lanes, 16 vector registers).
//
// sum4_avx2: the totals of four 8-lane partial sums x0..x3, as the four lanes of one 128-bit vector (three
// horizontal adds and one add of the halves: [x0, x1, x2, x3] each summed over its 8 lanes).
SPARSE_ATTN_AVX2 inline __m128 sum4_avx2(__m256 x0, __m256 x1, __m256 x2, __m256 x3) {
  // per 128-bit half: [x0 l0+l1, x0 l2+l3, x1 l0+l1, x1 l2+l3], then [x0, x1, x2, x3] summed over the half
  const __m256 c = _mm256_hadd_ps(_mm256_hadd_ps(x0, x1), _mm256_hadd_ps(x2, x3));
  return _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

// out[i] lane j = a_i . rows[j] for the M rows a_i = a + i * lda (M <= 3: 12 accumulators), k channels (a multiple
// of 8): dots16 with 8 keys, two groups of four.
template <int M>
SPARSE_ATTN_AVX2 inline void dots8(const float* a, int64_t lda, int64_t k, const float* const* rows, __m256* out) {
  static_assert(M >= 1 && M <= 3, "four accumulators per row: at most three rows fit the registers");
  __m128 half[M][2];
  for (int g = 0; g < 2; ++g) {
    const float* r0 = rows[4 * g];
    const float* r1 = rows[4 * g + 1];
    const float* r2 = rows[4 * g + 2];
    const float* r3 = rows[4 * g + 3];
    __m256 d[M][4];
    for (int i = 0; i < M; ++i) d[i][0] = d[i][1] = d[i][2] = d[i][3] = _mm256_setzero_ps();
    for (int64_t e = 0; e < k; e += 8) {
      const __m256 y0 = _mm256_loadu_ps(r0 + e), y1 = _mm256_loadu_ps(r1 + e), y2 = _mm256_loadu_ps(r2 + e),
                   y3 = _mm256_loadu_ps(r3 + e);
      for (int i = 0; i < M; ++i) {
        const __m256 x = _mm256_loadu_ps(a + i * lda + e);
        d[i][0] = _mm256_fmadd_ps(x, y0, d[i][0]);
        d[i][1] = _mm256_fmadd_ps(x, y1, d[i][1]);
        d[i][2] = _mm256_fmadd_ps(x, y2, d[i][2]);
        d[i][3] = _mm256_fmadd_ps(x, y3, d[i][3]);
      }
    }
    for (int i = 0; i < M; ++i) half[i][g] = sum4_avx2(d[i][0], d[i][1], d[i][2], d[i][3]);
  }
  for (int i = 0; i < M; ++i) out[i] = _mm256_set_m128(half[i][1], half[i][0]);
}

// dots8 for any number of rows, in groups of at most three; out[i] for i < m.
SPARSE_ATTN_AVX2 inline void dots8_rows(int64_t m, const float* a, int64_t lda, int64_t k, const float* const* rows,
                                        __m256* out) {
  for (int64_t i = 0; i < m; i += 3) {
    switch (std::min<int64_t>(3, m - i)) {
      case 1: dots8<1>(a + i * lda, lda, k, rows, out + i); break;
      case 2: dots8<2>(a + i * lda, lda, k, rows, out + i); break;
      default: dots8<3>(a + i * lda, lda, k, rows, out + i); break;
    }
  }
}

// Stores the first w (<= 8) lanes of x at p.
SPARSE_ATTN_AVX2 inline void store_lanes8(float* p, int64_t w, __m256 x) {
  if (w == 8) return _mm256_storeu_ps(p, x);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, x);
  std::copy(lanes, lanes + w, p);
}

// gemm_abt_short on AVX2: 8 keys at a time through dots8, the next 16 keys prefetched meanwhile.
SPARSE_ATTN_AVX2 void gemm_abt_short_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b,
                                          float* c, int64_t ldc) {
  constexpr int64_t kLookahead = 16;
  const float* rows[8];
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t w = std::min<int64_t>(8, n - j0);
    for (int64_t t = 0; t < 8; ++t) rows[t] = b[j0 + (t < w ? t : 0)];  // lanes past n repeat a key, not stored
    for (int64_t j = j0 + kLookahead; j < std::min(n, j0 + kLookahead + 8); ++j) prefetch_bytes(b[j], 4 * k);
    __m256 out[4];
    dots8_rows(m, a, lda, k, rows, out);
    for (int64_t i = 0; i < m; ++i) store_lanes8(c + i * ldc + j0, w, out[i]);
  }
}

// gemm_ab_acc_short on AVX2: a strip of 8 V columns of each of the M rows of C stays in registers over the whole K
// loop (M V accumulators, V loads and one broadcast per key: 13 registers or fewer). n a multiple of 8.
template <int M>
SPARSE_ATTN_AVX2 void gemm_ab_acc_short_avx2(int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
                                             int64_t ldc) {
  constexpr int V = M <= 2 ? 4 : (M == 3 ? 3 : 2);
  constexpr int64_t kLookahead = 16;
  for (int64_t j0 = 0; j0 < n; j0 += 8 * V) {
    const int64_t vecs = std::min<int64_t>(V, (n - j0) / 8);
    __m256 acc[M][V];
    for (int i = 0; i < M; ++i) {
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < k; ++p) {
      if (j0 == 0 && p + kLookahead < k) prefetch_bytes(b[p + kLookahead], 4 * n);
      const float* bp = b[p] + j0;
      __m256 y[V];
      for (int v = 0; v < V; ++v) y[v] = v < vecs ? _mm256_loadu_ps(bp + 8 * v) : _mm256_setzero_ps();
      for (int i = 0; i < M; ++i) {
        const __m256 x = _mm256_broadcast_ss(a + i * lda + p);
        for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(x, y[v], acc[i][v]);
      }
    }
    for (int i = 0; i < M; ++i) {
      float* ci = c + i * ldc + j0;
      for (int v = 0; v < vecs; ++v) _mm256_storeu_ps(ci + 8 * v, _mm256_add_ps(_mm256_loadu_ps(ci + 8 * v), acc[i][v]));
    }
  }
}

// The short products for m in [1, 4] rows on AVX-512, else AVX2; false when they do not apply (neither, or k (the
// scores) / n (the sums) not a multiple of 16 (AVX-512 scores) or 8 (AVX2)).
inline bool gemm_abt_short_fast(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
                                int64_t ldc) {
  if (m < 1 || m > 4) return false;
  if (k % 16 == 0 && has_avx512()) {
    with_rows<4>(m, [&](auto rows) { gemm_abt_short_avx512<decltype(rows)::value>(n, k, a, lda, b, c, ldc); });
    return true;
  }
  if (k % 8 != 0 || !has_avx2()) return false;
  gemm_abt_short_avx2(m, n, k, a, lda, b, c, ldc);
  return true;
}

inline bool gemm_ab_acc_short_fast(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
                                   int64_t ldc) {
  if (m < 1 || m > 4) return false;
  if (has_avx512()) {
    with_rows<4>(m, [&](auto rows) { gemm_ab_acc_short_avx512<decltype(rows)::value>(n, k, a, lda, b, c, ldc); });
    return true;
  }
  if (n % 8 != 0 || !has_avx2()) return false;
  with_rows<4>(m, [&](auto rows) { gemm_ab_acc_short_avx2<decltype(rows)::value>(n, k, a, lda, b, c, ldc); });
  return true;
}

// Tall products (prefill: a Q tile of many rows against a tile of keys), on AVX-512, without a BLAS call.
//
// Scores S = A B^T: the tile's keys B [n, k] are first transposed into Bt [k, n16] (n rounded up to 16, zero
// columns past n; 16 x 16 blocks transposed in registers), then each register tile of R rows x 32 keys keeps its
// 2R accumulators over the whole k loop: per e, two loads of Bt's row e and R broadcasts of A[r, e].
// Values P V: the rows of C stay in registers in strips of 64 columns (gemm_ab_acc_short_avx512 with M = 6).

// r[i] becomes column i of the 16 x 16 matrix whose rows were r[0..15]: unpack pairs of rows, then pairs of
// pairs, then 128-bit lanes twice (each stage halves the distance between the elements a column needs).
SPARSE_ATTN_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);  // per lane L: r0[4L], r1[4L], r0[4L+1], r1[4L+1]
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + c]: per lane L, column 4L + c of rows 4g..4g+3
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    // rows 0-7: lanes (0, 2) and (1, 3) of u[c], u[4 + c]; rows 8-15 likewise from u[8 + c], u[12 + c]
    t[c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// bt[e * ldt + j] = b[j][e] for j < n, e < k (k a multiple of 16); columns [n, round_up(n, 16)) are zero.
SPARSE_ATTN_AVX512 inline void transpose_rows(int64_t n, int64_t k, RowsOf b, float* bt, int64_t ldt) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t live = std::min<int64_t>(16, n - j0);
    for (int64_t e0 = 0; e0 < k; e0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) r[i] = i < live ? _mm512_loadu_ps(b[j0 + i] + e0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(bt + (e0 + i) * ldt + j0, r[i]);
    }
  }
}

// C[R, n16] = A[R, k] Bt[k, n16] for one row panel of R rows (ap[e * R + r], to_row_panels; n16 a multiple of 16).
// Bt's columns come in panels of 16: column j of row e at bt + (j / 16) * panel + e * ldt + j % 16 (panel 16: one
// row-major matrix; panel 16 k with ldt 16: key chunks, see gemm_abt_chunks). With n >= 0 only C's first n columns
// are stored (masked stores), else all n16.
// Stores columns [j, j + 16) of a row at `at`, only those below n (all with n < 0).
SPARSE_ATTN_AVX512 inline void store_columns(float* at, int64_t j, int64_t n, __m512 x) {
  if (n < 0 || j + 16 <= n) return _mm512_storeu_ps(at, x);
  _mm512_mask_storeu_ps(at, n > j ? static_cast<__mmask16>((1u << (n - j)) - 1) : 0, x);
}

template <int R>
SPARSE_ATTN_AVX512 void gemm_a_bt_rows(int64_t n16, int64_t k, const float* ap, const float* bt, int64_t ldt,
                                       float* c, int64_t ldc, int64_t panel = 16, int64_t n = -1) {
  for (int64_t j0 = 0; j0 < n16; j0 += 32) {
    const float* b0 = bt + (j0 / 16) * panel;
    if (j0 + 32 <= n16) {
      const float* b1 = b0 + panel;
      __m512 acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t e = 0; e < k; ++e) {
        const __m512 y0 = _mm512_loadu_ps(b0 + e * ldt), y1 = _mm512_loadu_ps(b1 + e * ldt);
        for (int r = 0; r < R; ++r) {
          const __m512 x = _mm512_set1_ps(ap[e * R + r]);
          acc[r][0] = _mm512_fmadd_ps(x, y0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(x, y1, acc[r][1]);
        }
      }
      for (int r = 0; r < R; ++r) {
        store_columns(c + r * ldc + j0, j0, n, acc[r][0]);
        store_columns(c + r * ldc + j0 + 16, j0 + 16, n, acc[r][1]);
      }
    } else {  // the last 16 columns
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t e = 0; e < k; ++e) {
        const __m512 y = _mm512_loadu_ps(b0 + e * ldt);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ap[e * R + r]), y, acc[r]);
      }
      for (int r = 0; r < R; ++r) store_columns(c + r * ldc + j0, j0, n, acc[r]);
    }
  }
}

// Whether the tall products below run for rows of k values (AVX-512, k a multiple of 16).
inline bool tall_products_fast(int64_t k) { return k % 16 == 0 && has_avx512(); }

// Keys as chunks of 16 consecutive positions, each chunk transposed: value e of the chunk's key i at
// chunk + e * 16 + i (16 k floats per chunk, chunks of consecutive positions adjacent). Packed once per call
// (pack_key_chunk), they let the tall score products read any run of keys that starts at a multiple of 16 in place,
// instead of transposing each tile's keys (gemm_abt_tall_fast).
SPARSE_ATTN_AVX512 inline void pack_key_chunk(RowsOf keys, int64_t live, int64_t k, float* chunk) {
  transpose_rows(live, k, keys, chunk, 16);  // columns past `live` are zero
}

// C[m, n] = A[m, k] K[n, k]^T for m > 4 rows of A as row panels (to_row_panels), where the n keys are the chunked
// keys (pack_key_chunk, starting at `chunks`) at positions pos[0..n): maximal runs of consecutive positions, each
// of which must start at a multiple of 16 (false, nothing written, when one does not, or without AVX-512 / k a
// multiple of 16). Only C's first n columns are written.
inline bool gemm_abt_chunks(int64_t m, int64_t n, int64_t k, const float* ap, const float* chunks, const int64_t* pos,
                            float* c, int64_t ldc) {
  if (m <= 4 || !tall_products_fast(k)) return false;
  for (int64_t j = 0; j < n; ++j) {
    if (pos[j] % 16 != 0 && (j == 0 || pos[j] != pos[j - 1] + 1)) return false;
  }
  for (int64_t j0 = 0; j0 < n;) {
    int64_t j1 = j0 + 1;
    while (j1 < n && pos[j1] == pos[j1 - 1] + 1) ++j1;
    const float* bt = chunks + (pos[j0] / 16) * 16 * k;
    const int64_t len = j1 - j0, len16 = (len + 15) / 16 * 16;
    for_row_groups<12>(m, [&](auto rows, int64_t i) {
      constexpr int R = decltype(rows)::value;
      gemm_a_bt_rows<R>(len16, k, ap + i * k, bt, 16, c + i * ldc + j0, ldc, 16 * k, len);
    });
    j0 = j1;
  }
  return true;
}

// C[m, n] += A[m, k] B[k, n] for m > 4 rows: groups of six rows (24 accumulators per 64 columns).
// A's rows 256 floats apart (the score tiles of the prefill kernel) take a register tile with that stride built in.
inline bool gemm_ab_acc_tall_fast(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
                                  int64_t ldc) {
  if (m <= 4 || !has_avx512()) return false;
  for_row_groups<6>(m, [&](auto rows, int64_t i) {
    constexpr int R = decltype(rows)::value;
    if (lda == 256) {
      gemm_ab_acc_short_avx512<R, 256>(n, k, a + i * lda, lda, b, c + i * ldc, ldc);
    } else {
      gemm_ab_acc_short_avx512<R>(n, k, a + i * lda, lda, b, c + i * ldc, ldc);
    }
  });
  return true;
}

// Scores from bf16-rounded rows (block estimation, where an estimate needs no more): the products of two bf16
// values are exact in fp32 and the sums stay fp32, so the scores are those of the rounded q and k. AVX512-BF16
// takes 32 value pairs per instruction (vdpbf16ps: lane i += a[2i] b[2i] + a[2i+1] b[2i+1]), twice the fp32
// products. Rows are packed as pairs of channels in 32-bit words; the keys' words are transposed like the floats of
// the fp32 scores: Bt2[e2, j] holds channels 2 e2 and 2 e2 + 1 of key j.
#define SPARSE_ATTN_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))
inline bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Rows of k floats (k a multiple of 32) as rows of k / 2 words of bf16 pairs (channels 2e, 2e + 1 in word e),
// rounded to nearest even: dst row r at dst + r * k / 2.
SPARSE_ATTN_AVX512_BF16 inline void to_bf16_pairs(RowsOf rows, int64_t count, int64_t k, uint32_t* dst) {
  for (int64_t r = 0; r < count; ++r) {
    const float* row = rows[r];
    for (int64_t e = 0; e < k; e += 32) {
      const __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + e + 16), _mm512_loadu_ps(row + e));
      _mm512_storeu_si512(dst + r * (k / 2) + e / 2, reinterpret_cast<__m512i>(pairs));
    }
  }
}

// C[R, n16] = A Bt2 for one row panel of R rows: ap[e2 * R + r] is word e2 of row r (to_row_panels), so the
// rows' words are read at fixed offsets from one pointer.
template <int R>
SPARSE_ATTN_AVX512_BF16 void gemm_a_bt_rows_bf16(int64_t n16, int64_t k2, const uint32_t* ap, const uint32_t* bt2,
                                                 int64_t ldt, float* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < n16; j0 += 32) {
    const bool two = j0 + 32 <= n16;
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t e2 = 0; e2 < k2; ++e2) {
      const uint32_t* row = bt2 + e2 * ldt + j0;
      const __m512bh y0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(row));
      const __m512bh y1 = two ? reinterpret_cast<__m512bh>(_mm512_loadu_si512(row + 16)) : y0;
      for (int r = 0; r < R; ++r) {
        const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(ap[e2 * R + r])));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, y0);
        if (two) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, y1);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(c + r * ldc + j0, acc[r][0]);
      if (two) _mm512_storeu_ps(c + r * ldc + j0 + 16, acc[r][1]);
    }
  }
}

// Scores from rows quantized to 16-bit integers (block estimation on CPUs with AVX512-VNNI but no AVX512-BF16, the
// same product rate: vpdpwssd takes 32 int16 pairs per instruction, lane i += a[2i] b[2i] + a[2i+1] b[2i+1] in
// int32). Each row x of A and of B is stored as round(x * L / max|x|) with its scale max|x| / L, so the score
// A[r] . B[j] = int_dot(r, j) * scale_a[r] * scale_b[j]: relative precision 1 / L of the row's largest value
// (about 2^-12 for head dim 64, finer than bf16's 2^-9 per value for all but the smallest values). L =
// floor(sqrt((2^31 - 1) / k)) keeps every int32 sum of k products in range. Rows holding NaN or inf are not
// quantized: the caller falls back to the fp32 products for that tile.
#define SPARSE_ATTN_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
inline bool has_avx512_vnni() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  return yes;
}

inline float int16_limit(int64_t k) {
  return std::floor(std::min(32767.0, std::sqrt(2147483647.0 / static_cast<double>(k))));
}

// Rows of k floats (k a multiple of 32) as rows of k / 2 words of int16 pairs (channels 2e, 2e + 1 in word e) and
// per-row scales; scales from `count` to `padded` are 0. False if a row holds NaN or inf.
SPARSE_ATTN_AVX512_VNNI inline bool to_int16_pairs(RowsOf rows, int64_t count, int64_t padded, int64_t k,
                                                   float limit, uint32_t* dst, float* scale) {
  for (int64_t r = 0; r < count; ++r) {
    const float* row = rows[r];
    __m512 top = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t e = 0; e < k; e += 16) {
      const __m512 x = _mm512_abs_ps(_mm512_loadu_ps(row + e));
      bad |= _mm512_cmp_ps_mask(x, _mm512_set1_ps(3.0e38f), _CMP_NLE_UQ);  // inf or NaN
      top = _mm512_max_ps(top, x);
    }
    if (bad) return false;
    const float amax = _mm512_reduce_max_ps(top);
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? limit / amax : 0.0f);
    scale[r] = amax / limit;
    int16_t* out = reinterpret_cast<int16_t*>(dst + r * (k / 2));
    for (int64_t e = 0; e < k; e += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + e), inv));  // round to nearest even
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + e), _mm512_cvtsepi32_epi16(v));
    }
  }
  std::fill(scale + count, scale + padded, 0.0f);
  return true;
}

// One row panel of R rows (ap[e2 * R + r], to_row_panels) against C columns [j0, j0 + 16 W) (W = 1 or 2 vectors of
// 16 keys); int32 sums (the first step's products by vpmaddwd, then accumulated by vpdpwssd), then scaled.
// acc += pairwise int16 products of a and b (vpdpwssd), as inline assembly: GCC's intrinsic copies the accumulator
// on every use.
SPARSE_ATTN_AVX512_VNNI inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

template <int R, bool Two>
SPARSE_ATTN_AVX512_VNNI inline void int16_tile(int64_t j0, int64_t k2, const uint32_t* ap, const float* scale_a,
                                               const uint32_t* bt2, int64_t ldt, const float* scale_b, float* c,
                                               int64_t ldc) {
  __m512i acc0[R], acc1[R];
  {
    const __m512i y0 = _mm512_loadu_si512(bt2 + j0);
    const __m512i y1 = Two ? _mm512_loadu_si512(bt2 + j0 + 16) : y0;
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_set1_epi32(static_cast<int>(ap[r]));
      acc0[r] = _mm512_madd_epi16(x, y0);
      if constexpr (Two) acc1[r] = _mm512_madd_epi16(x, y1);
    }
  }
  for (int64_t e2 = 1; e2 < k2; ++e2) {
    const __m512i y0 = _mm512_loadu_si512(bt2 + e2 * ldt + j0);
    const __m512i y1 = Two ? _mm512_loadu_si512(bt2 + e2 * ldt + j0 + 16) : y0;
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_set1_epi32(static_cast<int>(ap[e2 * R + r]));
      acc0[r] = dpwssd(acc0[r], x, y0);
      if constexpr (Two) acc1[r] = dpwssd(acc1[r], x, y1);
    }
  }
  const __m512 sb0 = _mm512_loadu_ps(scale_b + j0), sb1 = Two ? _mm512_loadu_ps(scale_b + j0 + 16) : sb0;
  for (int r = 0; r < R; ++r) {
    const __m512 sa = _mm512_set1_ps(scale_a[r]);
    _mm512_storeu_ps(c + r * ldc + j0, _mm512_mul_ps(_mm512_cvtepi32_ps(acc0[r]), _mm512_mul_ps(sb0, sa)));
    if constexpr (Two) {
      _mm512_storeu_ps(c + r * ldc + j0 + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(acc1[r]), _mm512_mul_ps(sb1, sa)));
    }
  }
}

template <int R>
SPARSE_ATTN_AVX512_VNNI void gemm_a_bt_rows_int16(int64_t n16, int64_t k2, const uint32_t* ap, const float* scale_a,
                                                  const uint32_t* bt2, int64_t ldt, const float* scale_b, float* c,
                                                  int64_t ldc) {
  int64_t j0 = 0;
  for (; j0 + 32 <= n16; j0 += 32) int16_tile<R, true>(j0, k2, ap, scale_a, bt2, ldt, scale_b, c, ldc);
  if (j0 < n16) int16_tile<R, false>(j0, k2, ap, scale_a, bt2, ldt, scale_b, c, ldc);
}

// The products block estimation uses for rows of k values (unless asked for exact scores).
enum class Products { kFp32, kBf16, kInt16 };
inline Products estimate_products(int64_t k) {
  if (k % 32 == 0 && has_avx512_bf16()) return Products::kBf16;
  if (k % 32 == 0 && has_avx512_vnni()) return Products::kInt16;
  return Products::kFp32;
}

// Key tiles packed once in the layout the tall products read, for products that read each tile many times (block
// estimation: every chunk of query rows reads every key tile before it). Per key column, packed_words words:
//   fp32:  the keys transposed, Bt[e, j] (k floats);
//   bf16:  rounded channel pairs, Bt2[e2, j] (k / 2 words);
//   int16: quantized channel pairs (k / 2 words), with a scale per key.
inline int64_t packed_words(Products p, int64_t k) { return p == Products::kFp32 ? k : k / 2; }

// Packs n keys into `bt` (rows of ldt >= round_up(n, 16) columns; the columns past n are zero) and, for int16,
// `scale` (ldt floats); `tmp` is scratch of n * k / 2 words. False where the tall products cannot read a packed
// tile (then they read the key rows): fp32 without AVX-512 or with k not a multiple of 16, int16 keys holding NaN
// or inf. bf16 and int16 need k a multiple of 32 and their instructions (see estimate_products).
inline bool pack_key_tile(Products p, RowsOf keys, int64_t n, int64_t k, int64_t ldt, uint32_t* bt, float* scale,
                          uint32_t* tmp) {
  const int64_t n16 = (n + 15) / 16 * 16;
  if (p == Products::kFp32) {
    if (!tall_products_fast(k)) return false;
    transpose_rows(n, k, keys, reinterpret_cast<float*>(bt), ldt);
    return true;
  }
  if (p == Products::kBf16) {
    to_bf16_pairs(keys, n, k, tmp);
  } else if (!to_int16_pairs(keys, n, n16, k, int16_limit(k), tmp, scale)) {
    return false;
  }
  transpose_rows(n, k / 2, RowsOf(reinterpret_cast<const float*>(tmp), k / 2), reinterpret_cast<float*>(bt), ldt);
  return true;
}

// C[m, n] = A B^T against a packed key tile (ldt columns per row), for m > 4 rows of A in row panels
// (to_row_panels): of k floats (fp32) or of k / 2 channel-pair words (bf16; int16 with per-row scales `scale_a`).
// C's rows have room for round_up(n, 16) columns.
inline void gemm_packed(Products p, int64_t m, int64_t n, int64_t k, const uint32_t* ap, const float* scale_a,
                        const uint32_t* bt, int64_t ldt, const float* scale_b, float* c, int64_t ldc) {
  const int64_t n16 = (n + 15) / 16 * 16, k2 = k / 2;
  for_row_groups<12>(m, [&](auto rows, int64_t i) {  // 24 accumulators of the 32 vector registers
    constexpr int R = decltype(rows)::value;
    if (p == Products::kFp32) {
      gemm_a_bt_rows<R>(n16, k, reinterpret_cast<const float*>(ap) + i * k, reinterpret_cast<const float*>(bt), ldt,
                        c + i * ldc, ldc);
    } else if (p == Products::kBf16) {
      gemm_a_bt_rows_bf16<R>(n16, k2, ap + i * k2, bt, ldt, c + i * ldc, ldc);
    } else {
      gemm_a_bt_rows_int16<R>(n16, k2, ap + i * k2, scale_a + i, bt, ldt, scale_b, c + i * ldc, ldc);
    }
  });
}

// C[m, n] = A[m, k] B[n, k]^T for m > 4 rows of A given as row panels (to_row_panels): the keys' tile packed
// (transposed) into `bt`, k * round_up(n, 16) floats of scratch, then the packed products; C's rows have room for
// round_up(n, 16) columns (those past n get zeros). False when it does not apply (no AVX-512, k not a multiple of
// 16, m <= 4).
inline bool gemm_abt_tall_fast(int64_t m, int64_t n, int64_t k, const float* ap, RowsOf b, float* c, int64_t ldc,
                               float* bt) {
  const int64_t n16 = (n + 15) / 16 * 16;
  auto* words = reinterpret_cast<uint32_t*>(bt);
  if (m <= 4 || !pack_key_tile(Products::kFp32, b, n, k, n16, words, nullptr, nullptr)) return false;
  gemm_packed(Products::kFp32, m, n, k, reinterpret_cast<const uint32_t*>(ap), nullptr, words, n16, nullptr, c, ldc);
  return true;
}
#else
inline bool tall_products_fast(int64_t) { return false; }
inline void pack_key_chunk(RowsOf, int64_t, int64_t, float*) {}
inline bool gemm_abt_chunks(int64_t, int64_t, int64_t, const float*, const float*, const int64_t*, float*, int64_t) {
  return false;
}
inline void to_bf16_pairs(RowsOf, int64_t, int64_t, uint32_t*) {}
inline bool gemm_abt_tall_fast(int64_t, int64_t, int64_t, const float*, RowsOf, float*, int64_t, float*) {
  return false;
}
enum class Products { kFp32, kBf16, kInt16 };
inline Products estimate_products(int64_t) { return Products::kFp32; }
inline int64_t packed_words(Products p, int64_t k) { return p == Products::kFp32 ? k : k / 2; }
inline bool pack_key_tile(Products, RowsOf, int64_t, int64_t, int64_t, uint32_t*, float*, uint32_t*) { return false; }
inline void gemm_packed(Products, int64_t, int64_t, int64_t, const uint32_t*, const float*, const uint32_t*, int64_t,
                        const float*, float*, int64_t) {}
inline bool to_int16_pairs(RowsOf, int64_t, int64_t, int64_t, float, uint32_t*, float*) { return false; }
inline float int16_limit(int64_t) { return 0.0f; }
inline bool gemm_ab_acc_tall_fast(int64_t, int64_t, int64_t, const float*, int64_t, RowsOf, float*, int64_t) {
  return false;
}
inline bool gemm_abt_short_fast(int64_t, int64_t, int64_t, const float*, int64_t, RowsOf, float*, int64_t) {
  return false;
}
inline bool gemm_ab_acc_short_fast(int64_t, int64_t, int64_t, const float*, int64_t, RowsOf, float*, int64_t) {
  return false;
}
#endif

// C[M, N] += A[M, K] B[K, N], row-major with leading dimensions: groups of four rows of C, each through the
// register strips of gemm_ab_acc_short.
void gemm_ab_acc_loops(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
                       int64_t ldc) {
  for (int64_t i = 0; i < m; i += 4) {
    const int64_t rows = std::min<int64_t>(4, m - i);
    if (gemm_ab_acc_short_fast(rows, n, k, a + i * lda, lda, b, c + i * ldc, ldc)) continue;
    gemm_ab_acc_short(rows, n, k, a + i * lda, lda, b, c + i * ldc, ldc);
  }
}

// Row-major products. With register-tile scratch (`tall_scratch`: k * round_up(n, 16) floats, C's rows room for
// round_up(n, 16) columns) and A's rows also as row panels (`a_panels`, to_row_panels), products of more than 4
// rows run on the AVX-512 register tiles where the CPU has them; otherwise through column-major sgemm (a row-major
// [r, c] matrix is its column-major transpose). Products with fewer than 4 rows (decode) are memory-bound and skip
// the BLAS call overhead; B rows given by pointers use the loops.
void gemm_abt(bool blas, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
              int64_t ldc, float* tall_scratch = nullptr, const float* a_panels = nullptr) {
  const bool tall = tall_scratch != nullptr && a_panels != nullptr;
  if (tall && gemm_abt_tall_fast(m, n, k, a_panels, b, c, ldc, tall_scratch)) return;
  if (k % 16 == 0 && (m <= 4 || !blas || b.ptrs)) {  // groups of four rows, 16 keys at a time
    for (int64_t i = 0; i < m; i += 4) {
      const int64_t rows = std::min<int64_t>(4, m - i);
      if (!gemm_abt_short_fast(rows, n, k, a + i * lda, lda, b, c + i * ldc, ldc)) {
        gemm_abt_short(rows, n, k, a + i * lda, lda, b, c + i * ldc, ldc);
      }
    }
    return;
  }
  if (!blas || m < 4 || b.ptrs) return gemm_abt_loops(m, n, k, a, lda, b, c, ldc);
  // C^T [n, m] = B [n, k] A^T [k, m]
  const int mi = n, ni = m, ki = k, la = b.ld, lb = lda, lc = ldc;
  const float one = 1.0f, zero = 0.0f;
  sgemm_("T", "N", &mi, &ni, &ki, &one, b.base, &la, a, &lb, &zero, c, &lc);
}

// C += A B; `tall`: products of more than 4 rows on the AVX-512 register tiles where the CPU has them.
void gemm_ab_acc(bool blas, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, RowsOf b, float* c,
                 int64_t ldc, bool tall = false) {
  if (tall && gemm_ab_acc_tall_fast(m, n, k, a, lda, b, c, ldc)) return;
  if (!blas || m <= 4 || b.ptrs) return gemm_ab_acc_loops(m, n, k, a, lda, b, c, ldc);
  // C^T [n, m] += B^T [n, k] A^T [k, m]
  const int mi = n, ni = m, ki = k, la = b.ld, lb = lda, lc = ldc;
  const float one = 1.0f;
  sgemm_("N", "N", &mi, &ni, &ki, &one, b.base, &la, a, &lb, &one, c, &lc);
}

// Causal rule on one tile: query row r (absolute position first_pos + r) sees keys at positions <= its own.
SPARSE_ATTN_ISA_CLONES
void mask_causal(float* s, int64_t ld, int64_t rows, int64_t cols, const int64_t* key_pos, int64_t first_pos) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    const int64_t pos = first_pos + r;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = key_pos[c] > pos ? kNegInf : row[c];
  }
}

// Keys a row group does not read: bits[c] is the set of row groups keeping key c; rows of group `bit` lose the rest.
SPARSE_ATTN_ISA_CLONES
void mask_members(float* s, int64_t ld, int64_t rows, int64_t cols, const uint8_t* bits, uint8_t bit) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = (bits[c] & bit) ? row[c] : kNegInf;
  }
}

SPARSE_ATTN_ISA_CLONES
float row_max_of(const float* row, int64_t cols) {
  float tile_max = kNegInf;  // a select, not std::max, so that the reduction vectorizes
#pragma omp simd reduction(max : tile_max)
  for (int64_t c = 0; c < cols; ++c) tile_max = row[c] > tile_max ? row[c] : tile_max;
  return tile_max;
}

// Online-softmax update of one tile (scores in log2 units): turns S into P in place, updates the running max m and
// sum l per row, and rescales the rows of acc by 2^(m_old - m_new). With a finite `skip`, a tile whose every row
// lies more than `skip` below that row's running max is left out: returns false and changes nothing.
SPARSE_ATTN_ISA_CLONES
bool softmax_update(float* s, int64_t ld, int64_t rows, int64_t cols, float* row_max, float* row_sum, float* acc,
                    int64_t dim, float skip = std::numeric_limits<float>::infinity()) {
  if (skip < std::numeric_limits<float>::infinity()) {
    bool negligible = true;
    for (int64_t r = 0; r < rows && negligible; ++r) {
      negligible = row_max[r] != kNegInf && row_max_of(s + r * ld, cols) < row_max[r] - skip;
    }
    if (negligible) return false;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    const float m_old = row_max[r], m_new = std::max(m_old, row_max_of(row, cols));
    if (m_new == kNegInf) {  // no key of this row so far: P = 0 keeps acc and l at 0
      bool nan = false;  // NaN scores (the max skips them) make the row NaN, through l, as in torch
      for (int64_t c = 0; c < cols; ++c) nan |= row[c] != row[c];
      std::fill(row, row + cols, 0.0f);
      if (nan) row_sum[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    float sum = 0.0f;
    int64_t done = 0;  // columns already exponentiated on 8 lanes; the rest (all without AVX2) below
#if defined(__x86_64__) && defined(__GNUC__)
    if (has_avx2()) {
      done = cols / 8 * 8;
      sum = exp2_row_avx2(row, done, m_new);
    }
#endif
#pragma omp simd reduction(+ : sum)
    for (int64_t c = done; c < cols; ++c) {
      const float p = exp2_nonpositive(row[c] - m_new);
      row[c] = p;
      sum += p;
    }
    const float correction = exp2_nonpositive(m_old - m_new);  // 0 when m_old = -inf
    if (correction != 1.0f) {
      float* acc_row = acc + r * dim;
#pragma omp simd
      for (int64_t e = 0; e < dim; ++e) acc_row[e] *= correction;
    }
    row_sum[r] = row_sum[r] * correction + sum;
    row_max[r] = m_new;
  }
  return true;
}

// Unpacks `dim` channels of a pruned vector into dense fp32: `next_bits(j)` gives the keep mask of channels
// [16 j, 16 j + 16), whose kept values follow one another in `values` (channel order); pruned channels are 0. Returns
// the number of values read. fp32 values on AVX-512 machines use the expand-load instruction (one per 16 channels),
// on AVX2 machines a table-driven permute per 8 channels; otherwise a loop over the set bits.
#if defined(__x86_64__) && defined(__GNUC__)
SPARSE_ATTN_AVX512 inline int64_t expand16_avx512(const float* values, uint16_t mask, float* out) {
  _mm512_storeu_ps(out, _mm512_maskz_expandloadu_ps(mask, values));
  return __builtin_popcount(mask);
}

// AVX2 has no expand-load: for each 8-bit keep mask a table gives every set lane its rank among the set lanes (the
// index of its value in the packed run), so a masked load of the run's popcount values, one permute and a mask of
// the set lanes place them (unset lanes 0, as the loop over the bits writes them; values are moved, not computed).
struct Expand8Table {
  int32_t index[256][8];
  constexpr Expand8Table() : index{} {
    for (int m = 0; m < 256; ++m) {
      for (int c = 0, rank = 0; c < 8; ++c) index[m][c] = (m >> c) & 1 ? rank++ : 0;
    }
  }
};
inline constexpr Expand8Table kExpand8{};

SPARSE_ATTN_AVX2 inline int expand8_avx2(const float* values, unsigned mask, float* out) {
  const int n = __builtin_popcount(mask);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 run = _mm256_maskload_ps(values, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));  // reads n values
  const __m256i index = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand8.index[mask]));
  const __m256i bit = _mm256_sllv_epi32(_mm256_set1_epi32(1), lane);
  const __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(mask)), bit), bit);
  _mm256_storeu_ps(out, _mm256_and_ps(_mm256_permutevar8x32_ps(run, index), _mm256_castsi256_ps(kept)));
  return n;
}

SPARSE_ATTN_AVX2 inline int64_t expand16_avx2(const float* values, uint16_t mask, float* out) {
  const int low = expand8_avx2(values, mask & 0xffu, out);
  return low + expand8_avx2(values + low, mask >> 8, out + 8);
}

// One pruned fp32 slot [K's `keep` values | V's | K's bitmap | V's] (head size a multiple of 16, so each 16-channel
// keep mask is two whole bitmap bytes) into dense K and V rows of `dim` values, 16 channels per expand-load.
SPARSE_ATTN_AVX512 inline void unpack_kv_slot_avx512(const float* slot, int64_t dim, int64_t keep, float* k_dst,
                                                     float* v_dst) {
  const int64_t bitmap_bytes = dim / 8;
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(slot + 2 * keep);
  const float* k = slot;
  const float* v = slot + keep;
  for (int64_t j = 0; j < dim / 16; ++j) {
    uint16_t k_mask, v_mask;
    std::memcpy(&k_mask, bits + 2 * j, 2);
    std::memcpy(&v_mask, bits + bitmap_bytes + 2 * j, 2);
    _mm512_storeu_ps(k_dst + 16 * j, _mm512_maskz_expandloadu_ps(k_mask, k));
    _mm512_storeu_ps(v_dst + 16 * j, _mm512_maskz_expandloadu_ps(v_mask, v));
    k += __builtin_popcount(k_mask);
    v += __builtin_popcount(v_mask);
  }
}

// unpack_kv_slot_avx512 on AVX2: 8 channels per table-driven permute (expand8_avx2), K and V halves in one pass.
SPARSE_ATTN_AVX2 inline void unpack_kv_slot_avx2(const float* slot, int64_t dim, int64_t keep, float* k_dst,
                                                 float* v_dst) {
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(slot + 2 * keep);
  const float* k = slot;
  const float* v = slot + keep;
  for (int64_t j = 0; j < dim / 8; ++j) {
    k += expand8_avx2(k, bits[j], k_dst + 8 * j);
    v += expand8_avx2(v, bits[dim / 8 + j], v_dst + 8 * j);
  }
}

// C[R, 16 Cn] += P[R, n] V[n, 16 Cn] for one group of R rows, where key e's V row is the dense row v[e] or, where
// v[e] is null, the V half of the pruned slot slots[e] (keep values and a bitmap of 2 Cn bytes), expanded into
// registers 16 channels at a time and never stored: C's R x Cn vectors stay in registers over all n keys.
template <int R, int Cn>
SPARSE_ATTN_AVX512 void gemm_ab_acc_slots_rows(int64_t n, int64_t keep, const float* p, int64_t ldp,
                                               const float* const* v, const float* const* slots, float* c,
                                               int64_t ldc) {
  __m512 acc[R][Cn];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < Cn; ++j) acc[r][j] = _mm512_loadu_ps(c + r * ldc + 16 * j);
  }
  for (int64_t e = 0; e < n; ++e) {
    __m512 x[Cn];
    if (v[e] != nullptr) {
      for (int j = 0; j < Cn; ++j) x[j] = _mm512_loadu_ps(v[e] + 16 * j);
    } else {
      const float* values = slots[e] + keep;
      const uint8_t* bits = reinterpret_cast<const uint8_t*>(slots[e] + 2 * keep) + 2 * Cn;
      for (int j = 0; j < Cn; ++j) {
        uint16_t mask;
        std::memcpy(&mask, bits + 2 * j, 2);
        x[j] = _mm512_maskz_expandloadu_ps(mask, values);
        values += __builtin_popcount(mask);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * ldp + e]);
      for (int j = 0; j < Cn; ++j) acc[r][j] = _mm512_fmadd_ps(pr, x[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < Cn; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
  }
}

// dots16 where key j is the dense row rows[j] or, where rows[j] is null, the K half of the pruned slot slots[j]
// (keep values; the bitmaps after both halves), expanded 16 channels at a time into registers, never stored.
template <int M>
SPARSE_ATTN_AVX512 inline void dots16_slots(const float* a, int64_t lda, int64_t k, int64_t keep,
                                            const float* const* rows, const float* const* slots, __m512* out) {
  __m512 quad[M][4];
  for (int g = 0; g < 4; ++g) {
    const float* dense[4];
    const float* values[4];
    const uint8_t* bits[4];
    for (int t = 0; t < 4; ++t) {
      dense[t] = rows[4 * g + t];
      values[t] = slots[4 * g + t];
      bits[t] = dense[t] != nullptr ? nullptr : reinterpret_cast<const uint8_t*>(values[t] + 2 * keep);
    }
    __m512 d[M][4];
    for (int i = 0; i < M; ++i) d[i][0] = d[i][1] = d[i][2] = d[i][3] = _mm512_setzero_ps();
    for (int64_t e = 0; e < k; e += 16) {
      __m512 y[4];
      for (int t = 0; t < 4; ++t) {
        if (dense[t] != nullptr) {
          y[t] = _mm512_loadu_ps(dense[t] + e);
        } else {
          uint16_t mask;
          std::memcpy(&mask, bits[t] + e / 8, 2);
          y[t] = _mm512_maskz_expandloadu_ps(mask, values[t]);
          values[t] += __builtin_popcount(mask);
        }
      }
      for (int i = 0; i < M; ++i) {
        const __m512 x = _mm512_loadu_ps(a + i * lda + e);
        for (int t = 0; t < 4; ++t) d[i][t] = _mm512_fmadd_ps(x, y[t], d[i][t]);
      }
    }
    for (int i = 0; i < M; ++i) quad[i][g] = sum4(d[i][0], d[i][1], d[i][2], d[i][3]);
  }
  for (int i = 0; i < M; ++i) out[i] = combine4(quad[i][0], quad[i][1], quad[i][2], quad[i][3]);
}

// C[M, n] = A[M, k] K[n, k]^T with keys dense (rows[j]) or pruned slots (slots[j] where rows[j] is null): 16 keys
// at a time through dots16_slots.
template <int M>
SPARSE_ATTN_AVX512 void gemm_abt_slots_rows(int64_t n, int64_t k, int64_t keep, const float* a, int64_t lda,
                                            const float* const* rows, const float* const* slots, float* c,
                                            int64_t ldc) {
  const float* r16[16];
  const float* s16[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, n - j0);
    for (int64_t t = 0; t < 16; ++t) {  // lanes past n repeat a key, not stored
      r16[t] = rows[j0 + (t < w ? t : 0)];
      s16[t] = slots[j0 + (t < w ? t : 0)];
    }
    __m512 out[M];
    dots16_slots<M>(a, lda, k, keep, r16, s16, out);
    const __mmask16 live = static_cast<__mmask16>((1u << w) - 1);
    for (int i = 0; i < M; ++i) _mm512_mask_storeu_ps(c + i * ldc + j0, live, out[i]);
  }
}

template <int Cn>
SPARSE_ATTN_AVX512 void gemm_ab_acc_slots_cn(int64_t m, int64_t n, int64_t keep, const float* p, int64_t ldp,
                                             const float* const* v, const float* const* slots, float* c,
                                             int64_t ldc) {
  for_row_groups<16 / Cn>(m, [&](auto rows, int64_t i) {  // at most 16 accumulators
    constexpr int R = decltype(rows)::value;
    gemm_ab_acc_slots_rows<R, Cn>(n, keep, p + i * ldp, ldp, v, slots, c + i * ldc, ldc);
  });
}
#endif

// Whether gemm_ab_acc_slots runs on this machine for heads of `dim` channels (AVX-512, dim 16 to 128, a multiple of
// 16).
inline bool ab_acc_slots_fast(int64_t dim) {
#if defined(__x86_64__) && defined(__GNUC__)
  return dim % 16 == 0 && dim <= 128 && has_avx512();
#else
  (void)dim;
  return false;
#endif
}

// C[m, dim] += P[m, n] V[n, dim] with V rows dense (v[e]) or pruned slots (slots[e] where v[e] is null): see
// gemm_ab_acc_slots_rows. Only where ab_acc_slots_fast(dim).
inline void gemm_ab_acc_slots(int64_t m, int64_t n, int64_t dim, int64_t keep, const float* p, int64_t ldp,
                              const float* const* v, const float* const* slots, float* c, int64_t ldc) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (dim / 16) {
    case 1: return gemm_ab_acc_slots_cn<1>(m, n, keep, p, ldp, v, slots, c, ldc);
    case 2: return gemm_ab_acc_slots_cn<2>(m, n, keep, p, ldp, v, slots, c, ldc);
    case 3: return gemm_ab_acc_slots_cn<3>(m, n, keep, p, ldp, v, slots, c, ldc);
    case 4: return gemm_ab_acc_slots_cn<4>(m, n, keep, p, ldp, v, slots, c, ldc);
    case 5: return gemm_ab_acc_slots_cn<5>(m, n, keep, p, ldp, v, slots, c, ldc);
    case 6: return gemm_ab_acc_slots_cn<6>(m, n, keep, p, ldp, v, slots, c, ldc);
    case 7: return gemm_ab_acc_slots_cn<7>(m, n, keep, p, ldp, v, slots, c, ldc);
    default: return gemm_ab_acc_slots_cn<8>(m, n, keep, p, ldp, v, slots, c, ldc);
  }
#else
  (void)m, (void)n, (void)dim, (void)keep, (void)p, (void)ldp, (void)v, (void)slots, (void)c, (void)ldc;
#endif
}

// C[m, n] = A[m, k] K[n, k]^T, key j dense (rows[j]) or the K half of the pruned slot slots[j] (rows[j] null),
// expanded in registers (gemm_abt_slots_rows), in groups of at most four rows. Only where ab_acc_slots_fast(k).
inline void gemm_abt_slots(int64_t m, int64_t n, int64_t k, int64_t keep, const float* a, int64_t lda,
                           const float* const* rows, const float* const* slots, float* c, int64_t ldc) {
#if defined(__x86_64__) && defined(__GNUC__)
  for (int64_t i = 0; i < m; i += 4) {
    with_rows<4>(std::min<int64_t>(4, m - i), [&](auto group) {
      gemm_abt_slots_rows<decltype(group)::value>(n, k, keep, a + i * lda, lda, rows, slots, c + i * ldc, ldc);
    });
  }
#else
  (void)m, (void)n, (void)k, (void)keep, (void)a, (void)lda, (void)rows, (void)slots, (void)c, (void)ldc;
#endif
}

// Whether unpack_kv_slot runs on this machine for heads of `dim` channels (AVX-512 or AVX2, dim a multiple of 16).
inline bool unpack_kv_slot_fast(int64_t dim) {
#if defined(__x86_64__) && defined(__GNUC__)
  return dim % 16 == 0 && (has_avx512() || has_avx2());
#else
  (void)dim;
  return false;
#endif
}

inline void unpack_kv_slot(const float* slot, int64_t dim, int64_t keep, float* k_dst, float* v_dst) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx512()) {
    unpack_kv_slot_avx512(slot, dim, keep, k_dst, v_dst);
  } else {
    unpack_kv_slot_avx2(slot, dim, keep, k_dst, v_dst);
  }
#else
  (void)slot, (void)dim, (void)keep, (void)k_dst, (void)v_dst;
#endif
}

template <typename T, typename Bits>
int64_t unpack_vector(const T* values, Bits&& next_bits, int64_t dim, float* out) {
  int64_t read = 0;
  for (int64_t j = 0; j * 16 < dim; ++j) {
    const uint16_t mask = next_bits(j);
    const int64_t width = std::min<int64_t>(16, dim - j * 16);
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (std::is_same_v<T, float>) {
      if (width == 16 && has_avx512()) {
        read += expand16_avx512(values + read, mask, out + j * 16);
        continue;
      }
      if (width == 16 && has_avx2()) {
        read += expand16_avx2(values + read, mask, out + j * 16);
        continue;
      }
    }
#endif
    for (int64_t c = 0; c < width; ++c) {
      const bool kept = (mask >> c) & 1;
      out[j * 16 + c] = kept ? static_cast<float>(values[read]) : 0.0f;
      read += kept;
    }
  }
  return read;
}

// Converts `rows` vectors of `dim` elements (row stride `stride`) into a dense fp32 [rows, dim] buffer, times `mul`.
template <typename T>
void to_float(const T* src, int64_t stride, int64_t rows, int64_t dim, float mul, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * stride;
    float* o = dst + r * dim;
    if constexpr (std::is_same_v<T, float>) {
      if (mul == 1.0f) {
        std::copy(in, in + dim, o);
        continue;
      }
    }
    for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<float>(in[e]) * mul;
  }
}

}  // namespace
}  // namespace sparse_attn
