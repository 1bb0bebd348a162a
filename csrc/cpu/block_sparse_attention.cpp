// Block-sparse attention on the CPU, flash style: one work item is (sequence, query block, query heads of one GQA
// group that share a mask row); it streams the KV blocks the row keeps through an online softmax, so work and memory
// follow the kept blocks only. The heads' rows are stacked into one Q tile: each K/V tile is read once per group.
//
// Per work item, with Q the block's rows pre-scaled by scale * log2(e) (so exp becomes exp2):
//   for each tile of kept keys (up to kTileKeys):  S = Q K^T,  mask causality where the tile reaches past the
//   block's first query,  m' = max(m, rowmax S),  P = 2^(S - m'),  l = l 2^(m - m') + rowsum P,
//   acc = acc 2^(m - m') + P V;
//   out = acc / l,  lse = (m + log2 l) ln 2  (natural log; -inf and out 0 when a row reads no key).
//
// The two products per tile run through the BLAS sgemm that torch's CPU library carries (MKL on x86, resolved as a
// weak symbol: the same routine torch's own CPU flash attention reaches through at::native::cpublas::gemm, which an
// extension cannot link) and otherwise through vectorized loops. fp32 keys of a contiguous run are read in place
// (leading dimension = token stride); fp16/bf16 keys, and short scattered blocks, are converted/gathered into an
// fp32 tile first. Softmax and accumulation are fp32. Each output row is computed by one thread in a fixed order,
// so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../ops.h"

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

constexpr int64_t kTileKeys = 256;       // keys per tile: large enough to amortize a GEMM call, small for L2
constexpr int64_t kInPlaceMinKeys = 32;  // fp32 runs of kept keys at least this long (on average) are read in place
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for x <= 0 (and -inf -> 0), written so the compiler vectorizes it: x = k + f with k = round(x),
// f in [-1/2, 1/2]; 2^f by its degree-6 Taylor polynomial, 2^k through the exponent bits: relative error 2.5e-7
// (a few ulps) over [-126, 0]. The shifter rounding needs IEEE evaluation order (the build uses no -ffast-math).
// Always inlined: a call would keep the loops that use it from being vectorized.
inline __attribute__((always_inline)) float exp2_nonpositive(float x) {
  const float xc = x > -126.0f ? x : -126.0f;
  const float k = (xc + 12582912.0f) - 12582912.0f;  // round to nearest via the 1.5 * 2^23 shifter
  const float f = xc - k;
  float p = 1.5403530393381609e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return x < -126.0f ? 0.0f : p * scale;
}

// C[M, N] = A[M, K] B[N, K]^T, row-major with leading dimensions. Four rows of A share each load of a B row.
SPARSE_ATTN_ISA_CLONES
void gemm_abt_loops(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                    int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const float *a0 = a + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
    for (int64_t j = 0; j < n; ++j) {
      const float* bj = b + j * ldb;
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t e = 0; e < k; ++e) {
        d0 += a0[e] * bj[e];
        d1 += a1[e] * bj[e];
        d2 += a2[e] * bj[e];
        d3 += a3[e] * bj[e];
      }
      float* cj = c + i * ldc + j;
      cj[0] = d0;
      cj[ldc] = d1;
      cj[2 * ldc] = d2;
      cj[3 * ldc] = d3;
    }
  }
  for (; i < m; ++i) {
    const float* ai = a + i * lda;
    for (int64_t j = 0; j < n; ++j) {
      const float* bj = b + j * ldb;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t e = 0; e < k; ++e) dot += ai[e] * bj[e];
      c[i * ldc + j] = dot;
    }
  }
}

// C[M, N] += A[M, K] B[K, N], row-major with leading dimensions. Four rows of C share each load of a B row.
SPARSE_ATTN_ISA_CLONES
void gemm_ab_acc_loops(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                       float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    float *c0 = c + i * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;
    for (int64_t p = 0; p < k; ++p) {
      const float* ap = a + i * lda + p;
      const float x0 = ap[0], x1 = ap[lda], x2 = ap[2 * lda], x3 = ap[3 * lda];
      const float* bp = b + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float y = bp[j];
        c0[j] += x0 * y;
        c1[j] += x1 * y;
        c2[j] += x2 * y;
        c3[j] += x3 * y;
      }
    }
  }
  for (; i < m; ++i) {
    float* ci = c + i * ldc;
    for (int64_t p = 0; p < k; ++p) {
      const float x = a[i * lda + p];
      const float* bp = b + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += x * bp[j];
    }
  }
}

// Row-major products through column-major sgemm: a row-major [r, c] matrix is its column-major transpose.
void gemm_abt(bool blas, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
              float* c, int64_t ldc) {
  if (!blas) return gemm_abt_loops(m, n, k, a, lda, b, ldb, c, ldc);
  // C^T [n, m] = B [n, k] A^T [k, m]
  const int mi = n, ni = m, ki = k, la = ldb, lb = lda, lc = ldc;
  const float one = 1.0f, zero = 0.0f;
  sgemm_("T", "N", &mi, &ni, &ki, &one, b, &la, a, &lb, &zero, c, &lc);
}

void gemm_ab_acc(bool blas, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc) {
  if (!blas) return gemm_ab_acc_loops(m, n, k, a, lda, b, ldb, c, ldc);
  // C^T [n, m] += B^T [n, k] A^T [k, m]
  const int mi = n, ni = m, ki = k, la = ldb, lb = lda, lc = ldc;
  const float one = 1.0f;
  sgemm_("N", "N", &mi, &ni, &ki, &one, b, &la, a, &lb, &one, c, &lc);
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

// Online-softmax update of one tile (scores in log2 units): turns S into P in place, updates the running max m and
// sum l per row, and rescales the rows of acc by 2^(m_old - m_new).
SPARSE_ATTN_ISA_CLONES
void softmax_update(float* s, int64_t ld, int64_t rows, int64_t cols, float* row_max, float* row_sum, float* acc,
                    int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    float tile_max = kNegInf;  // a select, not std::max, so that the reduction vectorizes
#pragma omp simd reduction(max : tile_max)
    for (int64_t c = 0; c < cols; ++c) tile_max = row[c] > tile_max ? row[c] : tile_max;
    const float m_old = row_max[r], m_new = std::max(m_old, tile_max);
    if (m_new == kNegInf) {  // no key of this row so far: P = 0 keeps acc and l at 0
      std::fill(row, row + cols, 0.0f);
      continue;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) {
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
}

// Converts `rows` vectors of `dim` elements (row stride `stride`) into a dense fp32 [rows, dim] buffer, times `mul`.
template <typename T>
void to_float(const T* src, int64_t stride, int64_t rows, int64_t dim, float mul, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * stride;
    float* o = dst + r * dim;
    for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<float>(in[e]) * mul;
  }
}

struct Problem {
  int64_t batch, q_heads, kv_heads, dim;
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, out_stride_t, out_stride_h;
  const int32_t* cu_q;
  const int32_t* cu_k;
  // Mask rows, read through strides (0 along a broadcast batch or head dimension).
  const int32_t* num_blocks;
  const int32_t* indices;
  int64_t nb_stride_b, nb_stride_h, nb_stride_q, idx_stride_b, idx_stride_h, idx_stride_q, idx_stride_w;
  int64_t q_block, kv_block;
  bool causal;
  float scale;
  bool blas;  // products through sgemm_ (else the vectorized loops)
};

// One unit of work: a query block of one sequence for `heads` consecutive query heads of one GQA group whose mask
// rows are identical (all of the group when the mask is shared, else one head). Their rows are stacked into one
// Q tile, so each K/V tile is read once for them and the products are taller.
struct WorkItem {
  int64_t cost;  // kept blocks x rows: the order in which items are handed out (largest first)
  int32_t seq, q_block, head0, heads;
};

// Per-thread scratch, sized once per call for the tallest Q tile.
struct Scratch {
  std::vector<float> q, s, acc, k, v, row_max, row_sum;
  std::vector<int64_t> key_pos;
  Scratch(int64_t q_rows, int64_t dim)
      : q(q_rows * dim), s(q_rows * kTileKeys), acc(q_rows * dim), k(kTileKeys * dim), v(kTileKeys * dim),
        row_max(q_rows), row_sum(q_rows), key_pos(kTileKeys) {}
};

// Mask row (count, block ids with their stride) of (sequence, head, query block).
struct MaskRow {
  int64_t count;
  const int32_t* blocks;
  int64_t stride;
  int32_t operator[](int64_t slot) const { return blocks[slot * stride]; }
  bool operator==(const MaskRow& o) const {
    if (count != o.count) return false;
    if (blocks == o.blocks && stride == o.stride) return true;  // the same row (a broadcast head dimension)
    for (int64_t i = 0; i < count; ++i) {
      if ((*this)[i] != o[i]) return false;
    }
    return true;
  }
};

MaskRow mask_row(const Problem& p, int64_t b, int64_t h, int64_t i) {
  return {p.num_blocks[b * p.nb_stride_b + h * p.nb_stride_h + i * p.nb_stride_q],
          p.indices + b * p.idx_stride_b + h * p.idx_stride_h + i * p.idx_stride_q, p.idx_stride_w};
}

template <typename T>
class BlockSparseAttention {
 public:
  BlockSparseAttention(const Problem& p, const T* q, const T* k, const T* v, T* out, float* lse, int64_t lse_stride)
      : p_(p), q_(q), k_(k), v_(v), out_(out), lse_(lse), lse_stride_(lse_stride) {}

  void run(const WorkItem& item, Scratch& w) const {
    const int64_t b = item.seq, kvh = item.head0 / (p_.q_heads / p_.kv_heads);
    const int64_t q_start = p_.cu_q[b], q_len = p_.cu_q[b + 1] - q_start;
    const int64_t k_start = p_.cu_k[b], kv_len = p_.cu_k[b + 1] - k_start;
    const int64_t row0 = int64_t{item.q_block} * p_.q_block;
    const int64_t rows = std::min(p_.q_block, q_len - row0);  // per head; the Q tile holds heads * rows
    const int64_t m = item.heads * rows, dim = p_.dim;
    const int64_t first_pos = kv_len - q_len + row0;  // absolute position of the block's first query
    // Keys past this bound are masked for every row of the block (length; causality from the last row).
    const int64_t key_end = p_.causal ? std::min(kv_len, first_pos + rows) : kv_len;

    std::fill(w.row_max.begin(), w.row_max.begin() + m, kNegInf);
    std::fill(w.row_sum.begin(), w.row_sum.begin() + m, 0.0f);
    std::fill(w.acc.begin(), w.acc.begin() + m * dim, 0.0f);
    for (int64_t j = 0; j < item.heads; ++j) {
      to_float(q_ + (q_start + row0) * p_.q_stride_t + (item.head0 + j) * p_.q_stride_h, p_.q_stride_t, rows, dim,
               p_.scale * kLog2e, w.q.data() + j * rows * dim);
    }

    const T* k_head = k_ + k_start * p_.k_stride_t + kvh * p_.k_stride_h;
    const T* v_head = v_ + k_start * p_.v_stride_t + kvh * p_.v_stride_h;
    const MaskRow row = mask_row(p_, b, item.head0, item.q_block);
    // fp32 keys are multiplied in place, one contiguous run per tile, when the kept blocks form runs of at least
    // kInPlaceMinKeys keys on average; otherwise (short scattered runs, fp16/bf16) keys are gathered (and
    // converted) into the fp32 tile, kTileKeys at a time.
    int64_t runs = row.count > 0;
    for (int64_t slot = 1; slot < row.count; ++slot) runs += row[slot] != row[slot - 1] + 1;
    const bool in_place = std::is_same_v<T, float> && p_.k_stride_t >= dim && p_.v_stride_t >= dim &&
                          row.count * p_.kv_block >= kInPlaceMinKeys * runs;

    int64_t tile_start = 0, tile_len = 0;  // in place: the current run [tile_start, tile_start + tile_len)
    auto flush = [&] {
      if (tile_len == 0) return;
      if (in_place) {
        std::iota(w.key_pos.begin(), w.key_pos.begin() + tile_len, tile_start);
        tile(item.heads, rows, first_pos, tile_len,
             reinterpret_cast<const float*>(k_head) + tile_start * p_.k_stride_t, p_.k_stride_t,
             reinterpret_cast<const float*>(v_head) + tile_start * p_.v_stride_t, p_.v_stride_t, w);
      } else {
        tile(item.heads, rows, first_pos, tile_len, w.k.data(), dim, w.v.data(), dim, w);
      }
      tile_len = 0;
    };
    for (int64_t slot = 0; slot < row.count; ++slot) {
      int64_t start = int64_t{row[slot]} * p_.kv_block;
      const int64_t end = std::min(start + p_.kv_block, key_end);
      while (start < end) {  // blocks past the sequence or wholly in the causal future give an empty range
        if (in_place) {
          if (tile_len > 0 && (start != tile_start + tile_len || tile_len == kTileKeys)) flush();
          if (tile_len == 0) tile_start = start;
          const int64_t take = std::min(end - start, kTileKeys - tile_len);
          tile_len += take;
          start += take;
        } else {
          const int64_t take = std::min(end - start, kTileKeys - tile_len);
          to_float(k_head + start * p_.k_stride_t, p_.k_stride_t, take, dim, 1.0f, w.k.data() + tile_len * dim);
          to_float(v_head + start * p_.v_stride_t, p_.v_stride_t, take, dim, 1.0f, w.v.data() + tile_len * dim);
          std::iota(w.key_pos.begin() + tile_len, w.key_pos.begin() + tile_len + take, start);
          tile_len += take;
          start += take;
          if (tile_len == kTileKeys) flush();
        }
      }
    }
    flush();
    for (int64_t j = 0; j < item.heads; ++j) finish(q_start + row0, rows, item.head0 + j, j * rows, w);
  }

 private:
  // One tile of n keys (rows of k/v with leading dimensions ldk/ldv; absolute positions in w.key_pos) for the
  // stacked Q tile of `heads` x `rows` rows.
  void tile(int64_t heads, int64_t rows, int64_t first_pos, int64_t n, const float* k, int64_t ldk, const float* v,
            int64_t ldv, Scratch& w) const {
    const int64_t m = heads * rows, dim = p_.dim;
    float* s = w.s.data();
    gemm_abt(p_.blas, m, n, dim, w.q.data(), dim, k, ldk, s, kTileKeys);
    if (p_.causal) {
      const int64_t last_key = *std::max_element(w.key_pos.begin(), w.key_pos.begin() + n);
      if (last_key > first_pos) {  // the tile reaches past the first query: mask each head's rows
        for (int64_t j = 0; j < heads; ++j) {
          mask_causal(s + j * rows * kTileKeys, kTileKeys, rows, n, w.key_pos.data(), first_pos);
        }
      }
    }
    softmax_update(s, kTileKeys, m, n, w.row_max.data(), w.row_sum.data(), w.acc.data(), dim);
    gemm_ab_acc(p_.blas, m, dim, n, s, kTileKeys, v, ldv, w.acc.data(), dim);
  }

  // Writes out = acc / l and lse for `rows` queries of head h, held at row `tile_row` of the Q tile.
  void finish(int64_t token0, int64_t rows, int64_t h, int64_t tile_row, const Scratch& w) const {
    const int64_t dim = p_.dim;
    for (int64_t r = 0; r < rows; ++r) {
      const float l = w.row_sum[tile_row + r];
      const float* acc = w.acc.data() + (tile_row + r) * dim;
      T* o = out_ + (token0 + r) * p_.out_stride_t + h * p_.out_stride_h;
      float* lse = lse_ + h * lse_stride_ + token0 + r;
      if (l > 0.0f) {
        const float inv = 1.0f / l;
        for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<T>(acc[e] * inv);
        *lse = (w.row_max[tile_row + r] + std::log2(l)) * kLn2;
      } else {
        std::fill(o, o + dim, static_cast<T>(0.0f));
        *lse = kNegInf;
      }
    }
  }

  Problem p_;
  const T* q_;
  const T* k_;
  const T* v_;
  T* out_;
  float* lse_;
  int64_t lse_stride_;
};

// Work items, most expensive first: threads take them from a shared counter, which balances causal prefill
// (cost grows with the query block) and ragged batches better than equal static ranges.
std::vector<WorkItem> work_items(const Problem& p) {
  const int64_t group = p.q_heads / p.kv_heads;
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q_len = p.cu_q[b + 1] - p.cu_q[b];
    const int64_t nq = (q_len + p.q_block - 1) / p.q_block;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t rows = std::min(p.q_block, q_len - i * p.q_block);
      for (int64_t g = 0; g < p.kv_heads; ++g) {
        const int64_t h0 = g * group;
        const MaskRow first = mask_row(p, b, h0, i);
        bool shared = true;
        for (int64_t j = 1; j < group && shared; ++j) shared = mask_row(p, b, h0 + j, i) == first;
        for (int64_t h = h0; h < h0 + group; h += shared ? group : 1) {
          const int64_t heads = shared ? group : 1;
          const int64_t count = shared ? first.count : mask_row(p, b, h, i).count;
          items.push_back({(count + 1) * rows * heads, static_cast<int32_t>(b), static_cast<int32_t>(i),
                           static_cast<int32_t>(h), static_cast<int32_t>(heads)});
        }
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& x, const WorkItem& y) { return x.cost > y.cost; });
  return items;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(const BlockSparseAttentionInputs& in) {
  const auto& q = in.q;
  const int64_t total_q = q.size(0), q_heads = q.size(1), dim = q.size(2);
  auto out = at::empty({total_q, q_heads, dim}, q.options());
  auto lse = at::empty({q_heads, total_q}, q.options().dtype(at::kFloat));
  if (total_q == 0) return {out, lse};

  Problem p;
  p.batch = in.cu_seqlens_q.size(0) - 1;
  p.q_heads = q_heads;
  p.kv_heads = in.k.size(1);
  p.dim = dim;
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_t = in.k.stride(0);
  p.k_stride_h = in.k.stride(1);
  p.v_stride_t = in.v.stride(0);
  p.v_stride_h = in.v.stride(1);
  p.out_stride_t = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.cu_q = in.cu_seqlens_q.data_ptr<int32_t>();
  p.cu_k = in.cu_seqlens_k.data_ptr<int32_t>();
  const auto& nb = in.kv_num_blocks;
  const auto& idx = in.kv_indices;
  p.num_blocks = nb.data_ptr<int32_t>();
  p.indices = idx.data_ptr<int32_t>();
  // A mask dimension of size 1 broadcasts over the batch or the heads.
  p.nb_stride_b = nb.size(0) == 1 ? 0 : nb.stride(0);
  p.nb_stride_h = nb.size(1) == 1 ? 0 : nb.stride(1);
  p.nb_stride_q = nb.stride(2);
  p.idx_stride_b = idx.size(0) == 1 ? 0 : idx.stride(0);
  p.idx_stride_h = idx.size(1) == 1 ? 0 : idx.stride(1);
  p.idx_stride_q = idx.stride(2);
  p.idx_stride_w = idx.stride(3);
  p.q_block = in.q_block_size;
  p.kv_block = in.kv_block_size;
  p.causal = in.causal;
  p.scale = static_cast<float>(in.scale);
  p.blas = in.use_blas && sgemm_ != nullptr;

  const std::vector<WorkItem> items = work_items(p);
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "block_sparse_attention_cpu", [&] {
    const BlockSparseAttention<scalar_t> op(p, q.data_ptr<scalar_t>(), in.k.data_ptr<scalar_t>(),
                                            in.v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                            lse.data_ptr<float>(), lse.stride(0));
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      Scratch scratch(p.q_block * (q_heads / p.kv_heads), dim);
      for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) op.run(items[i], scratch);
    });
  });
  return {out, lse};
}

}  // namespace sparse_attn
