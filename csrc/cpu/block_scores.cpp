// Pooled block scores on the CPU: the estimate head-proxy selection ranks blocks by, computed tile by tile without
// materializing a row's scores.
//
// For every sampled query row r of a proxy head (position pos_r) the softmax over its visible keys is
// P[r, n] = 2^(s[r, n] - m_r) / l_r with s = q.k * scale * log2(e). Per row and KV block j the kernel keeps a
// reference bm[j] and the sum bs[j] = sum_{n in j} 2^(s[r, n] - bm[j]), one pass over the keys: bm[j] is the block's
// max score (max pooling needs it) or the row's running max when the block was scored (mean pooling: one exp2 per
// score and no per-block max). At the row's end m_r = max_j bm[j] and l_r = sum_j bs[j] 2^(bm[j] - m_r), and the
// block's pooled value is
//   max pooling:  max_{n in j} P[r, n] = 2^(bm[j] - m_r) / l_r   (the max over the block's rows is kept),
//   mean pooling: sum_{n in j} P[r, n] = bs[j] 2^(bm[j] - m_r) / l_r   (averaged over the block's rows).
//
// One work item is (KV head, a chunk of query blocks): the sampled rows of every proxy head that reads the KV head
// and of every query block of the chunk are stacked into one Q tile (up to kTileRows rows), so each key tile is
// read once per chunk and the score products are tall GEMMs. A chunk reads the keys up to its last row (causal).
// The key tiles are packed once per call in the products' layout (int16 or bf16 channel pairs, or transposed fp32;
// kernel_utils.h: pack_key_tile) and the Q tile once per chunk (row panels), so no chunk converts a key again.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "kernel_utils.h"

namespace sparse_attn {
namespace {

constexpr int64_t kTileRows = 256;  // Q tile rows per work item (all proxy heads of a KV head, several blocks)
constexpr int64_t kTileKeys = 256;  // keys per tile (rounded up to whole KV blocks)

// sum_c 2^(s[c] - m) over n scores (inlined into the callers' ISA clones, where it vectorizes).
inline float exp2_sum(const float* s, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += exp2_nonpositive(s[c] - m);
  return sum;
}

// Mean pooling needs only each block's sum, taken against one reference per row and tile: the row's running max
// `ref` (raised to the tile's max first). Per block: bsum = sum 2^(s - ref), bmax = ref (the sum's scale).
SPARSE_ATTN_ISA_CLONES
void block_stats_mean_generic(const float* s, int64_t n, int64_t bk, float m, float* bmax, float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    bmax[j] = m;
    bsum[j] = exp2_sum(s + b0, std::min(bk, n - b0), m);
  }
}

// Max pooling: per block of bk scores (the last one may be shorter), its max bm and its sum 2^(s - bm).
SPARSE_ATTN_ISA_CLONES
void block_stats_max_generic(const float* s, int64_t n, int64_t bk, float* bmax, float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    const int64_t len = std::min(bk, n - b0);
    float m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < len; ++c) m = s[b0 + c] > m ? s[b0 + c] : m;
    bmax[j] = m;
    bsum[j] = exp2_sum(s + b0, len, m);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// 2^x on 16 lanes for the estimate, x <= 0 or NaN: 2^x = 2^k 2^f with k = round(x), 2^f by a degree-4 minimax
// polynomial on [-1/2, 1/2] (relative error 2.7e-6, below the int16 and bf16 products' own), 2^k applied by scalef,
// which rounds results below 2^-126 to subnormals and zero. NaN stays NaN (max returns its second operand); -inf
// (an overflowed score) gives 0.
constexpr float kExp2Estimate[5] = {9.5718065e-3f, 5.5918004e-2f, 2.4024703e-1f, 6.9312179e-1f, 9.9999928e-1f};
SPARSE_ATTN_AVX512 inline __m512 exp2_estimate16(__m512 x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
  const __m512 k = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, k);
  __m512 p = _mm512_set1_ps(kExp2Estimate[0]);
#pragma GCC unroll 4
  for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Estimate[i]));
  return _mm512_scalef_ps(p, k);
}

// The lanes of a vector of 16 that hold one of the `left` values still to read.
inline __mmask16 live_lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

// exp2_sum on AVX-512: 16-lane partial sums, reduced once.
SPARSE_ATTN_AVX512 inline float exp2_sum16(const float* s, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 live = live_lanes(n - c);
    const __m512 x = _mm512_maskz_loadu_ps(live, s + c);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(live, exp2_estimate16(_mm512_sub_ps(x, vm))));
  }
  return _mm512_reduce_add_ps(acc);
}

// Blocks of a multiple of 16 keys.
SPARSE_ATTN_AVX512 void block_stats_mean_avx512(const float* s, int64_t n, int64_t bk, float m, float* bmax,
                                                float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    bmax[j] = m;
    bsum[j] = exp2_sum16(s + b0, std::min(bk, n - b0), m);
  }
}

// Mean pooling over a whole tile of 256 keys (16 vectors; blocks of bk = 16 V keys) held in registers: the scores
// are read once for the running max and the block sums, and the blocks' horizontal sums are taken together
// (kernel_utils.h: sum4, combine4).
template <int V>
SPARSE_ATTN_AVX512 void tile_stats_mean_avx512(const float* s, float* ref, float* bmax, float* bsum) {
  constexpr int kBlocks = 16 / V;
  __m512 x[16], top[4];
  for (int c = 0; c < 4; ++c) top[c] = _mm512_set1_ps(*ref);
  for (int i = 0; i < 16; ++i) {
    x[i] = _mm512_loadu_ps(s + 16 * i);
    top[i % 4] = _mm512_max_ps(x[i], top[i % 4]);  // NaN scores are passed over
  }
  const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(top[0], top[1]), _mm512_max_ps(top[2], top[3])));
  *ref = m;
  if (m == kNegInf) return;
  const __m512 vm = _mm512_set1_ps(m);
  __m512 y[kBlocks];
  for (int b = 0; b < kBlocks; ++b) {
    y[b] = exp2_estimate16(_mm512_sub_ps(x[b * V], vm));
    for (int i = 1; i < V; ++i) y[b] = _mm512_add_ps(y[b], exp2_estimate16(_mm512_sub_ps(x[b * V + i], vm)));
    bmax[b] = m;
  }
  if constexpr (kBlocks == 16) {
    _mm512_storeu_ps(bsum, combine4(sum4(y[0], y[1], y[2], y[3]), sum4(y[4], y[5], y[6], y[7]),
                                    sum4(y[8], y[9], y[10], y[11]), sum4(y[12], y[13], y[14], y[15])));
  } else if constexpr (kBlocks == 8) {
    const __m512 lo = sum4(y[0], y[1], y[2], y[3]), hi = sum4(y[4], y[5], y[6], y[7]);
    _mm512_mask_storeu_ps(bsum, 0xff, combine4(lo, hi, lo, hi));
  } else if constexpr (kBlocks == 4) {
    const __m512 q = sum4(y[0], y[1], y[2], y[3]);
    _mm512_mask_storeu_ps(bsum, 0xf, combine4(q, q, q, q));
  } else {
    for (int b = 0; b < kBlocks; ++b) bsum[b] = _mm512_reduce_add_ps(y[b]);
  }
}

// A whole tile's mean-pooling statistics in registers, where its blocks divide it; false otherwise.
SPARSE_ATTN_AVX512 bool tile_stats_mean(const float* s, int64_t n, int64_t bk, float* ref, float* bmax, float* bsum) {
  static_assert(kTileKeys == 256, "a whole tile is 16 vectors");
  if (n != kTileKeys) return false;
  switch (bk) {
    case 16: tile_stats_mean_avx512<1>(s, ref, bmax, bsum); return true;
    case 32: tile_stats_mean_avx512<2>(s, ref, bmax, bsum); return true;
    case 64: tile_stats_mean_avx512<4>(s, ref, bmax, bsum); return true;
    case 128: tile_stats_mean_avx512<8>(s, ref, bmax, bsum); return true;
    case 256: tile_stats_mean_avx512<16>(s, ref, bmax, bsum); return true;
    default: return false;
  }
}

// The estimate's 2^x on 8 lanes (AVX2), x <= 0 or NaN: the polynomial of exp2_estimate16, 2^k through the exponent
// bits; x < -126 gives 0 (no subnormals), -inf 0, NaN stays NaN (max returns its second operand).
SPARSE_ATTN_AVX2 inline __m256 exp2_estimate8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f), shifter = _mm256_set1_ps(12582912.0f);
  const __m256 xc = _mm256_max_ps(lo, x);
  const __m256 k = _mm256_sub_ps(_mm256_add_ps(xc, shifter), shifter);  // round to nearest
  const __m256 f = _mm256_sub_ps(xc, k);
  __m256 p = _mm256_set1_ps(kExp2Estimate[0]);
#pragma GCC unroll 4
  for (int i = 1; i < 5; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Estimate[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// exp2_sum on AVX2: 8-lane partial sums; the lanes past n are read as -inf (2^-inf = 0).
SPARSE_ATTN_AVX2 inline float exp2_sum8(const float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = _mm256_add_ps(acc, exp2_estimate8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vm)));
  if (c < n) {
    alignas(32) float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = c + i < n ? s[c + i] : kNegInf;
    acc = _mm256_add_ps(acc, exp2_estimate8(_mm256_sub_ps(_mm256_load_ps(tail), vm)));
  }
  return sum8_avx2(acc);
}

SPARSE_ATTN_AVX2 void block_stats_mean_avx2(const float* s, int64_t n, int64_t bk, float m, float* bmax, float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    bmax[j] = m;
    bsum[j] = exp2_sum8(s + b0, std::min(bk, n - b0), m);
  }
}

SPARSE_ATTN_AVX2 void block_stats_max_avx2(const float* s, int64_t n, int64_t bk, float* bmax, float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    const int64_t len = std::min(bk, n - b0);
    __m256 top = _mm256_set1_ps(kNegInf);
    int64_t c = 0;
    for (; c + 8 <= len; c += 8) top = _mm256_max_ps(_mm256_loadu_ps(s + b0 + c), top);  // NaN scores are passed over
    float m = kNegInf;
    for (; c < len; ++c) m = s[b0 + c] > m ? s[b0 + c] : m;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    bmax[j] = std::max(m, _mm_cvtss_f32(h));
    bsum[j] = exp2_sum8(s + b0, len, bmax[j]);
  }
}

SPARSE_ATTN_AVX512 void block_stats_max_avx512(const float* s, int64_t n, int64_t bk, float* bmax, float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    const int64_t len = std::min(bk, n - b0);
    __m512 top = _mm512_set1_ps(kNegInf);
    for (int64_t c = 0; c < len; c += 16) {
      const __mmask16 live = live_lanes(len - c);
      top = _mm512_mask_max_ps(top, live, _mm512_maskz_loadu_ps(live, s + b0 + c), top);  // NaN scores are passed over
    }
    bmax[j] = _mm512_reduce_max_ps(top);
    bsum[j] = exp2_sum16(s + b0, len, bmax[j]);
  }
}
#endif

// Max pooling: per block of bk scores (the last one may be shorter), its max bm and its sum 2^(s - bm).
void block_stats_max(const float* s, int64_t n, int64_t bk, float* bmax, float* bsum) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (bk % 16 == 0 && has_avx512()) return block_stats_max_avx512(s, n, bk, bmax, bsum);
  if (has_avx2()) return block_stats_max_avx2(s, n, bk, bmax, bsum);
#endif
  block_stats_max_generic(s, n, bk, bmax, bsum);
}

SPARSE_ATTN_ISA_CLONES
float running_max(const float* s, int64_t n, float m) {
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = s[c] > m ? s[c] : m;
  return m;
}

void block_stats_mean(const float* s, int64_t n, int64_t bk, float* ref, float* bmax, float* bsum) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx512() && tile_stats_mean(s, n, bk, ref, bmax, bsum)) return;
#endif
  const float m = running_max(s, n, *ref);
  *ref = m;
  if (m == kNegInf) return;
#if defined(__x86_64__) && defined(__GNUC__)
  if (bk % 16 == 0 && has_avx512()) return block_stats_mean_avx512(s, n, bk, m, bmax, bsum);
  if (has_avx2()) return block_stats_mean_avx2(s, n, bk, m, bmax, bsum);
#endif
  block_stats_mean_generic(s, n, bk, m, bmax, bsum);
}

// One row's pooled values over its first n blocks (references bm, sums bs): weights w = 2^(bm - max bm), l = sum bs w;
// mean pooling adds bs w / (l valid) to dst, max pooling keeps max(dst, w / l).
SPARSE_ATTN_ISA_CLONES
void pool_row(const float* bm, const float* bs, int64_t n, bool mean, int64_t valid, float* w, float* dst) {
  float top = kNegInf;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < n; ++j) top = bm[j] > top ? bm[j] : top;
  if (top == kNegInf) return;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    w[j] = exp2_nonpositive(bm[j] - top);
    total += bs[j] * w[j];
  }
  if (mean) {
    const float scale = 1.0f / (total * static_cast<float>(valid));
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] += bs[j] * w[j] * scale;
  } else {
    const float scale = 1.0f / total;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = std::max(dst[j], w[j] * scale);
  }
}

struct Chunk {
  int64_t cost;
  int32_t kv_head, first_block, last_block;  // query blocks [first_block, last_block)
};

// The products named (see PooledBlockScoresInputs), checked against this CPU and the head dim.
Products products_of(const std::string& name, int64_t dim) {
  if (name == "auto") return estimate_products(dim);
  if (name == "fp32") return Products::kFp32;
  TORCH_CHECK(name == "bf16" || name == "int16", "products must be 'auto', 'fp32', 'bf16' or 'int16', got '", name,
              "'");
  const Products want = name == "bf16" ? Products::kBf16 : Products::kInt16;
  bool available = dim % 32 == 0;
#if defined(__x86_64__) && defined(__GNUC__)
  available = available && (want == Products::kBf16 ? has_avx512_bf16() : has_avx512_vnni());
#else
  available = false;
#endif
  TORCH_CHECK(available, "products='", name, "' needs ", want == Products::kBf16 ? "AVX512-BF16" : "AVX512-VNNI",
              " and a head dim that is a multiple of 32 (head dim ", dim, ")");
  return want;
}

template <typename T>
void pooled_scores(const PooledBlockScoresInputs& in, at::Tensor& out) {
  const auto& q = in.q;  // [P, nq, R, D]
  const int64_t proxies = q.size(0), nq = q.size(1), rows = q.size(2), dim = q.size(3);
  const int64_t kv_len = in.k.size(0), kv_heads = in.k.size(1), bk = in.kv_block_size;
  const int64_t nk = out.size(2), per_kv = proxies / kv_heads;
  const int64_t tile_keys = std::max(kTileKeys, bk) / bk * bk;
  const int64_t tile_cols = (tile_keys + 15) / 16 * 16;  // score rows: room for the tall products' 16-key vectors
  const int64_t chunk_blocks = std::max<int64_t>(1, kTileRows / (per_kv * rows));
  const float mul = static_cast<float>(in.scale) * kLog2e;
  const T* qp = q.data_ptr<T>();
  const T* kp = in.k.data_ptr<T>();
  const int64_t k_stride_t = in.k.stride(0), k_stride_h = in.k.stride(1);
  const int32_t* pos = in.pos.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const bool blas = sgemm_ != nullptr;
  const Products products = products_of(in.products, dim);

  // Keys the rows of query blocks [first, last) may see: up to their largest position (causal), else all.
  auto keys_seen = [&](int64_t first, int64_t last) {
    if (!in.causal) return kv_len;
    int64_t top = -1;
    for (int64_t i = first * rows; i < last * rows; ++i) top = std::max<int64_t>(top, pos[i]);
    return std::min(kv_len, top + 1);
  };
  std::vector<int64_t> valid_rows(nq, 0);  // sampled rows of each query block (mean pooling averages over them)
  for (int64_t i = 0; i < nq * rows; ++i) valid_rows[i / rows] += pos[i] >= 0;
  std::vector<Chunk> chunks;
  for (int64_t g = 0; g < kv_heads; ++g) {
    for (int64_t i = 0; i < nq; i += chunk_blocks) {
      const int64_t last = std::min(nq, i + chunk_blocks);
      chunks.push_back({keys_seen(i, last) * (last - i), static_cast<int32_t>(g), static_cast<int32_t>(i),
                        static_cast<int32_t>(last)});
    }
  }
  std::stable_sort(chunks.begin(), chunks.end(), [](const Chunk& x, const Chunk& y) { return x.cost > y.cost; });

  // Key tiles in the products' layout (kernel_utils.h: pack_key_tile), packed once per call where several chunks
  // read them, else by each chunk as it reads them. Tiles start at multiples of tile_keys for every chunk.
  const bool tall = products != Products::kFp32 || tall_products_fast(dim);
  const int64_t tiles = (kv_len + tile_keys - 1) / tile_keys, tile_words = packed_words(products, dim) * tile_cols;
  const bool prepack = tall && nq > chunk_blocks;
  std::vector<uint32_t> packed(prepack ? kv_heads * tiles * tile_words : 0);
  std::vector<float> packed_scale(prepack ? kv_heads * tiles * tile_cols : 0);
  std::vector<uint8_t> packed_ok(prepack ? kv_heads * tiles : 0);
  // The keys [start, start + n) of KV head g as float rows (T = float: in place; else converted into `kt`).
  auto key_rows = [&](int64_t g, int64_t start, int64_t n, float* kt) {
    const T* src = kp + g * k_stride_h + start * k_stride_t;
    if constexpr (std::is_same_v<T, float>) {
      return RowsOf(src, k_stride_t);
    } else {
      to_float(src, k_stride_t, n, dim, 1.0f, kt);
      return RowsOf(kt, dim);
    }
  };
  if (prepack) {
    at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> kt(std::is_same_v<T, float> ? 0 : tile_keys * dim);
      std::vector<uint32_t> tmp(tile_keys * dim / 2);
      for (int64_t x = begin; x < end; ++x) {
        const int64_t start = x % tiles * tile_keys, n = std::min(tile_keys, kv_len - start);
        packed_ok[x] = pack_key_tile(products, key_rows(x / tiles, start, n, kt.data()), n, dim, tile_cols,
                                     packed.data() + x * tile_words, packed_scale.data() + x * tile_cols, tmp.data());
      }
    });
  }

  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_chunks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int64_t max_rows = per_kv * chunk_blocks * rows;
    std::vector<float> qt(max_rows * dim), s(max_rows * tile_cols), bt(tile_cols * dim);
    std::vector<uint32_t> q_words(products == Products::kFp32 ? 0 : max_rows * dim / 2),
        q_panels(max_rows * packed_words(products, dim)),
        tile(prepack ? 0 : tile_words), tmp(prepack ? 0 : tile_keys * dim / 2);
    std::vector<float> kt(std::is_same_v<T, float> ? 0 : tile_keys * dim);
    std::vector<float> q_scale(max_rows), k_scale(prepack ? 0 : tile_cols);
    std::vector<float> bmax(max_rows * nk), bsum(max_rows * nk), ref(max_rows), weight(nk);
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const Chunk& ch = chunks[c];
      const int64_t blocks = ch.last_block - ch.first_block, m = per_kv * blocks * rows;
      const int64_t seen = keys_seen(ch.first_block, ch.last_block), seen_blocks = (seen + bk - 1) / bk;
      // Tile row (j, i, r): proxy head g * per_kv + j, query block first_block + i, sampled row r.
      for (int64_t j = 0; j < per_kv; ++j) {
        const T* src = qp + ((ch.kv_head * per_kv + j) * nq + ch.first_block) * rows * dim;
        to_float(src, dim, blocks * rows, dim, mul, qt.data() + j * blocks * rows * dim);
      }
      // The tile's rows in the products' form, once for all its key tiles: a tall tile (m > 4) reads packed keys;
      // fp32 products from the rows where m <= 4 or int16 rows hold NaN or inf.
      bool packed_rows = tall && m > 4;
      if (packed_rows && products == Products::kBf16) {
        to_bf16_pairs(RowsOf(qt.data(), dim), m, dim, q_words.data());
      } else if (packed_rows && products == Products::kInt16) {
        packed_rows = to_int16_pairs(RowsOf(qt.data(), dim), m, m, dim, int16_limit(dim), q_words.data(),
                                     q_scale.data());
      }
      if (packed_rows && products == Products::kFp32) {
        to_row_panels(qt.data(), dim, m, dim, reinterpret_cast<float*>(q_panels.data()));
      } else if (packed_rows) {
        to_row_panels(q_words.data(), dim / 2, m, dim / 2, q_panels.data());
      }
      std::fill(bmax.begin(), bmax.begin() + m * nk, kNegInf);
      std::fill(bsum.begin(), bsum.begin() + m * nk, 0.0f);
      std::fill(ref.begin(), ref.begin() + m, kNegInf);
      for (int64_t start = 0; start < seen; start += tile_keys) {
        const int64_t n = std::min(tile_keys, seen - start), x = ch.kv_head * tiles + start / tile_keys;
        const uint32_t* kb = nullptr;
        const float* kb_scale = nullptr;
        if (packed_rows && prepack && packed_ok[x]) {
          kb = packed.data() + x * tile_words, kb_scale = packed_scale.data() + x * tile_cols;
        } else if (packed_rows && !prepack &&
                   pack_key_tile(products, key_rows(ch.kv_head, start, n, kt.data()), n, dim, tile_cols,
                                 tile.data(), k_scale.data(), tmp.data())) {
          kb = tile.data(), kb_scale = k_scale.data();
        }
        if (kb != nullptr) {
          gemm_packed(products, m, n, dim, q_panels.data(), q_scale.data(), kb, tile_cols, kb_scale, s.data(),
                      tile_cols);
        } else {
          gemm_abt(blas, m, n, dim, qt.data(), dim, key_rows(ch.kv_head, start, n, kt.data()), s.data(), tile_cols,
                   bt.data());
        }
        for (int64_t t = 0; t < m; ++t) {
          const int64_t row_pos = pos[(ch.first_block + (t / rows) % blocks) * rows + t % rows];
          if (row_pos < 0) continue;  // an empty slot
          const int64_t visible = in.causal ? std::min(n, row_pos + 1 - start) : n;
          if (visible <= 0) continue;
          const int64_t jb = start / bk;
          if (in.mean) {
            block_stats_mean(s.data() + t * tile_cols, visible, bk, &ref[t], &bmax[t * nk + jb], &bsum[t * nk + jb]);
          } else {
            block_stats_max(s.data() + t * tile_cols, visible, bk, &bmax[t * nk + jb], &bsum[t * nk + jb]);
          }
        }
      }
      // Normalize each row and pool into its query block.
      for (int64_t t = 0; t < m; ++t) {
        const int64_t i = ch.first_block + (t / rows) % blocks, proxy = ch.kv_head * per_kv + t / (blocks * rows);
        if (pos[i * rows + t % rows] < 0) continue;
        const int64_t valid = in.mean ? valid_rows[i] : 1;
        pool_row(bmax.data() + t * nk, bsum.data() + t * nk, seen_blocks, in.mean, valid, weight.data(),
                 o + (proxy * nq + i) * nk);
      }
    }
  });
}

}  // namespace

// Block selection from pooled scores, per (query head h, query block i): the always-kept blocks (block 0, the
// attention sink, and the diagonal block diag[i] >= 0) count first within the budget b_h; the rest of the budget goes
// to the visible blocks j < bound[i] with the highest scores of head h's proxy (ties: the lower block, a strict total
// order, so every head's set is defined). Query blocks i >= tail_from keep every block. Heads sharing a proxy share
// its candidates: one selection (nth_element, linear) per distinct budget, largest first, each within the last.
// emit(h, i, always, n_always, chosen, n_chosen) receives each (head, query block)'s set (chosen == nullptr: every
// block, a tail row); the calls for different (h, i) may run in parallel.
template <typename Emit>
void select_blocks_impl(const SelectBlocksInputs& in, Emit emit) {
  const int64_t proxies = in.scores.size(0), nq = in.scores.size(1), nk = in.scores.size(2);
  const int64_t heads = in.budgets.size(0);
  const float* sc = in.scores.data_ptr<float>();
  const int64_t* budget = in.budgets.data_ptr<int64_t>();
  const int64_t* proxy = in.proxy_of_head.data_ptr<int64_t>();
  const int64_t* bound = in.bounds.data_ptr<int64_t>();
  const int64_t* diag = in.diag.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> heads_of(proxies);
  for (int64_t h = 0; h < heads; ++h) heads_of[proxy[h]].push_back(h);
  at::parallel_for(0, proxies * nq, 64, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order(nk);
    std::vector<float> val(nk);
    std::vector<int64_t> take, ranks;  // per head of the proxy: blocks beyond the always-kept ones; their sizes
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / nq, i = item % nq;
      if (heads_of[p].empty()) continue;
      if (i >= in.tail_from) {
        for (int64_t h : heads_of[p]) emit(h, i, nullptr, 0, nullptr, 0);
        continue;
      }
      const int64_t visible = std::min(bound[i], nk), d = diag[i];
      const bool has_diag = d > 0 && d < nk;  // d == 0 is the sink itself
      const int32_t always[2] = {0, static_cast<int32_t>(d)};
      const int64_t n_always = 1 + (has_diag ? 1 : 0);
      // Candidates: the visible blocks other than the always-kept ones (NaN scores rank last).
      const float* s = sc + (p * nq + i) * nk;
      int64_t n = 0;
      for (int64_t j = 1; j < visible; ++j) {
        if (j == d) continue;
        val[j] = std::isnan(s[j]) ? kNegInf : s[j];
        order[n++] = static_cast<int32_t>(j);
      }
      auto better = [&val](int32_t a, int32_t b) { return val[a] > val[b] || (val[a] == val[b] && a < b); };
      take.clear();
      for (int64_t h : heads_of[p]) take.push_back(std::min(n, std::max<int64_t>(0, budget[h] - n_always)));
      ranks = take;
      std::sort(ranks.begin(), ranks.end(), std::greater<int64_t>());
      int64_t range = n;
      for (int64_t t : ranks) {  // the best t of the best `range`: one linear selection each
        if (t > 0 && t < range) std::nth_element(order.begin(), order.begin() + t, order.begin() + range, better);
        range = t;
      }
      for (size_t x = 0; x < heads_of[p].size(); ++x) emit(heads_of[p][x], i, always, n_always, order.data(), take[x]);
    }
  });
}

void select_blocks_cpu(const SelectBlocksInputs& in, at::Tensor& keep) {
  const int64_t nq = in.scores.size(1), nk = in.scores.size(2);
  bool* out = keep.data_ptr<bool>();
  select_blocks_impl(in, [&](int64_t h, int64_t i, const int32_t* always, int64_t n_always, const int32_t* chosen,
                             int64_t n_chosen) {
    bool* row = out + (h * nq + i) * nk;
    if (chosen == nullptr) {
      std::fill_n(row, nk, true);
      return;
    }
    for (int64_t t = 0; t < n_always; ++t) row[always[t]] = true;
    for (int64_t t = 0; t < n_chosen; ++t) row[chosen[t]] = true;
  });
}

std::tuple<at::Tensor, at::Tensor> select_block_rows_cpu(const SelectBlocksInputs& in) {
  const int64_t nq = in.scores.size(1), nk = in.scores.size(2), heads = in.budgets.size(0);
  const int64_t* budget = in.budgets.data_ptr<int64_t>();
  const int64_t* bound = in.bounds.data_ptr<int64_t>();
  const int64_t* diag = in.diag.data_ptr<int64_t>();
  // Each row's count, known before selecting: a tail row's visible blocks; else the always-kept blocks it can see
  // and min(candidates, budget - always-kept) more (as select_blocks_impl takes them).
  auto counts = at::empty({heads, nq}, in.scores.options().dtype(at::kInt));
  int32_t* cnt = counts.data_ptr<int32_t>();
  int64_t width = 1;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t visible = std::min(bound[i], nk), d = diag[i];
    const bool has_diag = d > 0 && d < nk;
    const int64_t candidates = std::max<int64_t>(0, visible - 1 - (has_diag && d < visible ? 1 : 0));
    const int64_t seen_always = (visible > 0 ? 1 : 0) + (has_diag && d < visible ? 1 : 0);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t n = i >= in.tail_from
                            ? visible
                            : seen_always + std::min(candidates, std::max<int64_t>(0, budget[h] - 1 - has_diag));
      cnt[h * nq + i] = static_cast<int32_t>(n);
      width = std::max(width, n);
    }
  }
  auto indices = at::zeros({heads, nq, width}, in.scores.options().dtype(at::kInt));
  int32_t* idx = indices.data_ptr<int32_t>();
  if (heads == 0 || nq == 0 || nk == 0) return {counts, indices};
  select_blocks_impl(in, [&](int64_t h, int64_t i, const int32_t* always, int64_t n_always, const int32_t* chosen,
                             int64_t n_chosen) {
    int32_t* row = idx + (h * nq + i) * width;
    const int64_t visible = std::min(bound[i], nk);
    if (chosen == nullptr) {  // a tail row: every visible block
      for (int64_t j = 0; j < visible; ++j) row[j] = static_cast<int32_t>(j);
      return;
    }
    int64_t m = 0;  // the always-kept blocks it can see, then the chosen ones (all visible), ascending
    for (int64_t t = 0; t < n_always; ++t) {
      if (always[t] < visible) row[m++] = always[t];
    }
    std::copy(chosen, chosen + n_chosen, row + m);
    std::sort(row, row + m + n_chosen);
  });
  return {counts, indices};
}

const char* estimate_products_cpu(int64_t dim) {
  switch (estimate_products(dim)) {
    case Products::kBf16: return "bf16";
    case Products::kInt16: return "int16";
    default: return "fp32";
  }
}

at::Tensor pooled_block_scores_cpu(const PooledBlockScoresInputs& in) {
  const int64_t nk = (in.k.size(0) + in.kv_block_size - 1) / in.kv_block_size;
  auto out = at::zeros({in.q.size(0), in.q.size(1), nk}, in.q.options().dtype(at::kFloat));
  if (in.q.numel() == 0 || nk == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "pooled_block_scores_cpu",
                                  [&] { pooled_scores<scalar_t>(in, out); });
  return out;
}

}  // namespace sparse_attn
