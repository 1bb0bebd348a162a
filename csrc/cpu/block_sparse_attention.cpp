// Block-sparse attention on the CPU, flash style, for prefill and decode rows alike.
//
// One work item is (sequence, query block, the query heads of one GQA group that share a mask row, a slice of that
// row's kept blocks). It streams the keys of its blocks through an online softmax, so work and memory follow the
// kept blocks only. The heads' rows are stacked into one Q tile: each K/V tile is read once per group. Heads whose
// rows differ a little (per-head plans) are stacked too, over the union of their rows with each head's other keys
// masked out, while that costs at most 20% more products than the rows alone.
//
// Per work item, with Q the block's rows pre-scaled by scale * log2(e) (so exp becomes exp2):
//   for each tile of kept keys (up to kTileKeys):  S = Q K^T,  mask causality where the tile reaches past the
//   block's first query,  m' = max(m, rowmax S),  P = 2^(S - m'),  l = l 2^(m - m') + rowsum P,
//   acc = acc 2^(m - m') + P V;
//   out = acc / l,  lse = (m + log2 l) ln 2  (natural log; -inf and out 0 when a row reads no key).
// A row whose kept blocks are split over several items (few rows, long contexts: decode) gets one partial
// (out, lse) per slice, merged exactly: lse = log sum_s e^lse_s, out = sum_s e^(lse_s - lse) out_s.
//
// Keys are addressed either in a varlen layout (key t of sequence b is row cu_k[b] + t) or in pages (row
// block_table[b, t / page_size] * page_size + t % page_size of the page tensor), so a paged KV cache is read in
// place. Keys are consumed as physical runs (consecutive keys in consecutive rows). For the BLAS products an fp32
// run of at least kInPlaceMinKeys keys is multiplied in place (leading dimension = row stride); shorter runs
// (scattered small blocks, small pages) and fp16/bf16 keys are copied (and converted) into an fp32 tile of kTileKeys
// keys, so every product is a tall GEMM whatever the block or page size. Short Q tiles (decode: the heads of one KV
// group) read every fp32 key and value in place through a pointer per key, so decode reads the cache's bytes once;
// on AVX-512 their products take 16 keys at a time (kernel_utils.h: dots16), and pruned fp32 slots are gathered as
// pointers and unpacked per tile with the slots ahead prefetched.
//
// Threshold skipping (optional): a tile whose scores all lie more than `skip` below their rows' running maxima
// contributes at most n 2^-skip of each row's mass; its exponentials and its P V product are skipped.
//
// On AVX-512 the two products per tile run on register tiles; the score products of fp32 prefill read the keys
// packed once per call as transposed chunks of 16 positions (kernel_utils.h: gemm_abt_chunks; pruned slots
// unpacked and the step's own tokens taken from new_k while packing), so no tile transposes, copies or unpacks its
// keys, and a key read by several query blocks or heads is packed once (tiles whose runs do not start on a chunk
// transpose their own: gemm_abt_tall_fast). Decode tiles over pruned slots expand their K and V halves in
// registers inside the two products (gemm_abt_slots, gemm_ab_acc_slots): no slot is unpacked into memory.
// Elsewhere products go through the BLAS sgemm that torch's CPU library carries (MKL on x86, resolved as a weak
// symbol: the same routine torch's own CPU flash attention reaches through at::native::cpublas::gemm, which an
// extension cannot link) and otherwise through vectorized loops.
// Softmax and accumulation are fp32. Each output row is computed by one thread in a fixed order, so results do not
// depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "kernel_utils.h"

namespace sparse_attn {
namespace {

constexpr int64_t kTileKeys = 256;        // keys per tile: large enough to amortize a GEMM call, small for L2
constexpr int64_t kInPlaceMinKeys = 128;  // fp32 runs at least this long are multiplied in place
constexpr int64_t kMinSplitKeys = 256;    // a slice of a split row holds at least this many keys
constexpr int64_t kItemsPerThread = 4;    // rows are split until there are this many items per thread
constexpr int64_t kSerialCost = 16384;    // calls with fewer key x row products than this run on one thread,
constexpr int64_t kSerialKeys = 1024;     // unless they read at least this many key rows (decode: memory-bound)
constexpr int64_t kDirectMaxRows = 8;     // Q tiles of at most this many rows read K and V in place, key by key

struct Problem {
  int64_t batch, q_heads, kv_heads, dim;
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, out_stride_t, out_stride_h;
  const int32_t* cu_q;
  const int32_t* kv_lens;  // keys of each sequence
  // Cached keys. Varlen: key t of sequence b is row cu_k[b] + t. Paged (block_table set): row
  // block_table[b * table_stride + t / page_size] * page_size + t % page_size.
  const int32_t* cu_k;
  const int32_t* block_table;
  int64_t table_stride, page_size;
  int64_t max_rows;  // rows of the largest query block that exists: min(q_block, longest q_len)
  // Pruned slots (slot_keep > 0): a row of k is [K's slot_keep values | V's | K's keep bitmap | V's] (v unused).
  int64_t slot_keep, bitmap_bytes;
  // Fresh keys (has_fresh): positions kv_len - q_len + i (the step's own tokens) read row cu_q[b] + i of new_k/new_v.
  bool has_fresh;
  int64_t nk_stride_t, nk_stride_h, nv_stride_t, nv_stride_h;
  // Mask rows, read through strides (0 along a broadcast batch or head dimension); null: every key (dense). Query
  // head h reads mask head h / mask_head_div (1: per query head or broadcast; the group size: per KV head).
  const int32_t* num_blocks;
  const int32_t* indices;
  int64_t nb_stride_b, nb_stride_h, nb_stride_q, idx_stride_b, idx_stride_h, idx_stride_q, idx_stride_w;
  int64_t mask_head_div;
  int64_t q_block, kv_block;
  bool causal;
  float scale;
  float skip;  // threshold skipping in log2 units (+inf: off)
  bool blas;   // products through sgemm_ (else the vectorized loops)
  bool tall;   // tall products through the AVX-512 register tiles where the CPU has them (before sgemm_)
  // Decode over token-major rows (the KV heads of a key side by side, as in vLLM's pages) with one mask row for
  // every head: one item reads all KV heads of its keys, tile by tile, so memory streams whole rows.
  bool all_kv_heads;
  // The cached keys packed once per call as chunks of 16 positions (kernel_utils.h: pack_key_chunk), for the tall
  // score products: sequence b's KV head h starts at key_chunks + chunk_base[b * kv_heads + h]. Null: not packed.
  const float* key_chunks;
  const int64_t* chunk_base;

  bool dense() const { return num_blocks == nullptr; }

  // First fresh position of sequence b (past the end without fresh keys).
  int64_t fresh_start(int64_t b) const {
    return has_fresh ? kv_lens[b] - (cu_q[b + 1] - cu_q[b]) : std::numeric_limits<int64_t>::max();
  }
  // Physical row of cached key t of sequence b, and one past the last key from t on that lies in consecutive rows
  // (the end of t's page; a varlen sequence is one run).
  int64_t key_row(int64_t b, int64_t t) const {
    if (block_table == nullptr) return cu_k[b] + t;
    return int64_t{block_table[b * table_stride + t / page_size]} * page_size + t % page_size;
  }
  int64_t run_end(int64_t b, int64_t t, int64_t end) const {
    return block_table == nullptr ? end : std::min(end, (t / page_size + 1) * page_size);
  }
};

// Unpacks `rows` pruned slots (row stride `stride`) into dense fp32 vectors: K (which = 0) or V (which = 1).
template <typename T>
void unpack_slots(const T* slots, int64_t stride, int64_t rows, int64_t dim, int64_t keep, int64_t bitmap_bytes,
                  int which, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* slot = slots + r * stride;
    const uint8_t* bits = reinterpret_cast<const uint8_t*>(slot + 2 * keep) + which * bitmap_bytes;
    unpack_vector(slot + which * keep, [&](int64_t j) {  // bitmap bytes 2j, 2j + 1 (the last may be missing)
      return static_cast<uint16_t>(bits[2 * j] | (2 * j + 1 < bitmap_bytes ? bits[2 * j + 1] << 8 : 0));
    }, dim, dst + r * dim);
  }
}

// Mask row (count, block ids with their stride) of (sequence, head, query block). Dense rows are blocks 0..count-1.
struct MaskRow {
  int64_t count;
  const int32_t* blocks;  // null: dense
  int64_t stride;
  int64_t operator[](int64_t slot) const { return blocks ? int64_t{blocks[slot * stride]} : slot; }
  bool operator==(const MaskRow& o) const {
    if (count != o.count) return false;
    if (blocks == o.blocks && stride == o.stride) return true;  // the same row (dense, or a broadcast head)
    for (int64_t i = 0; i < count; ++i) {
      if ((*this)[i] != o[i]) return false;
    }
    return true;
  }
};

// Where the keys of query block i of sequence b end for every row of the block (length; causality from the last
// row), and the first absolute query position.
struct BlockGeometry {
  int64_t q_start, rows, first_pos, key_end;
};

BlockGeometry geometry(const Problem& p, int64_t b, int64_t i) {
  const int64_t q_start = p.cu_q[b], q_len = p.cu_q[b + 1] - q_start, kv_len = p.kv_lens[b];
  const int64_t row0 = i * p.q_block, rows = std::min(p.q_block, q_len - row0);
  const int64_t first_pos = kv_len - q_len + row0;
  return {q_start + row0, rows, first_pos, p.causal ? std::min(kv_len, first_pos + rows) : kv_len};
}

MaskRow mask_row(const Problem& p, int64_t b, int64_t h, int64_t i) {
  if (p.dense()) {
    const BlockGeometry g = geometry(p, b, i);
    return {(g.key_end + p.kv_block - 1) / p.kv_block, nullptr, 0};
  }
  const int64_t mh = h / p.mask_head_div;
  return {p.num_blocks[b * p.nb_stride_b + mh * p.nb_stride_h + i * p.nb_stride_q],
          p.indices + b * p.idx_stride_b + mh * p.idx_stride_h + i * p.idx_stride_q, p.idx_stride_w};
}

// One unit of work: query blocks [q_block, q_block + span) of sequence `seq` for `heads` consecutive query heads of
// one GQA group whose mask rows are identical (or, with `per_head`, differ: then span is 1 and each head's row is
// its own), reading the union of those rows' kept blocks, slots [slot_begin, slot_end) of it. Stacking heads and
// neighbouring query blocks makes the Q tile tall enough for efficient products when blocks are small, and the
// heads of a group read each K/V tile once; a key a stacked row does not keep is masked out of its rows.
// `partial` >= 0 marks a slice of a split row (span 1): its (out, lse) go to the partial buffers and are merged.
struct WorkItem {
  int64_t cost;  // keys x rows: the order in which items are handed out (largest first)
  int32_t seq, q_block, span, head0, heads;
  int32_t slot_begin, slot_end;
  int32_t partial;
  int32_t kv_count;  // KV groups the item covers (all of them with Problem::all_kv_heads, else 1): `heads` each
  bool per_head = false;  // the heads' mask rows differ: one membership bit per head

  // Mask rows stacked in the Q tile (one membership bit each): head j's query block i is unit j * span + i.
  int64_t units() const { return per_head ? int64_t{heads} * span : span; }
};

constexpr int64_t kMaxSpan = 4;           // query blocks stacked into one tile at most
constexpr int64_t kMaxUnits = 8;          // mask rows stacked into one tile at most (a byte of membership bits)
constexpr int64_t kTargetTileRows = 128;  // stack query blocks until the Q tile has this many rows
constexpr double kMaxUnionOverhead = 1.1; // ... while the union reads at most this much more than the rows alone
// The heads of a GQA group with different mask rows share a tile while the union's products (every head's rows
// against every key of the union) exceed the heads' own by at most this factor: the taller tile and the shared
// K/V tiles pay for it.
constexpr double kMaxHeadUnionOverhead = 1.2;

// The kept blocks of `span` (<= kMaxUnits) sorted mask rows merged: emit(block, bits) for each block of the union in
// ascending order, `bits` the set of the rows keeping it.
template <typename Emit>
void for_union(const MaskRow* rows, int64_t span, Emit&& emit) {
  int64_t at[kMaxUnits] = {};
  while (true) {
    int64_t next = std::numeric_limits<int64_t>::max();
    for (int64_t i = 0; i < span; ++i) {
      if (at[i] < rows[i].count) next = std::min(next, rows[i][at[i]]);
    }
    if (next == std::numeric_limits<int64_t>::max()) return;
    uint8_t set = 0;
    for (int64_t i = 0; i < span; ++i) {
      if (at[i] < rows[i].count && rows[i][at[i]] == next) set |= uint8_t(1u << i), ++at[i];
    }
    emit(next, set);
  }
}

// The union as ascending block ids with their membership bits.
void merge_rows(const MaskRow* rows, int64_t span, std::vector<int32_t>& blocks, std::vector<uint8_t>& bits) {
  blocks.clear();
  bits.clear();
  for_union(rows, span, [&](int64_t block, uint8_t set) {
    blocks.push_back(static_cast<int32_t>(block));
    bits.push_back(set);
  });
}

// Per-thread scratch for the tallest Q tile of a call. Each thread keeps its own between calls (Scratch::local):
// a decode step calls the kernel once per layer with a few hundred keys per thread, and allocating and clearing the
// tile buffers (over 100 KB) on every call cost as much as reading the keys. Every buffer is written before it is
// read within a tile, so no call depends on what an earlier one left.
struct Scratch {
  std::vector<float> q, s, acc, k, v, kt, row_max, row_sum;  // kt: a tile's keys transposed (tall products)
  std::vector<float> q_panels;  // the Q tile as row panels (tall products: kernel_utils.h, to_row_panels)
  std::vector<const float*> k_rows, v_rows;  // the tile's keys and values, read in place (short Q tiles)
  std::vector<const float*> slot_rows;  // pruned slots expanded inside the products (k_rows and v_rows null)
  bool slot_keys = false;  // the current tile reads some of its keys from slot_rows
  std::vector<const float*> k_first, v_first;  // ... of the item's first KV head, and the strides to the others
  std::vector<int64_t> k_head_stride, v_head_stride;
  std::vector<int64_t> key_pos;
  std::vector<uint8_t> key_bits, union_bits;
  std::vector<int32_t> union_blocks;
  int64_t tiles = 0, skipped = 0;
  float sink = 0.0f;  // the loads of touch_lines land here

  // This thread's scratch, grown (never shrunk) to hold a Q tile of q_rows rows of head dimension dim; counters reset.
  static Scratch& local(int64_t q_rows, int64_t dim) {
    thread_local Scratch w;
    w.reserve(q_rows, dim);
    w.tiles = w.skipped = 0;
    w.slot_keys = false;
    return w;
  }

 private:
  void reserve(int64_t q_rows, int64_t dim) {
    const auto grow = [](auto& buffer, int64_t size) {
      if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
    };
    grow(q, q_rows * dim), grow(s, q_rows * kTileKeys), grow(acc, q_rows * dim), grow(k, kTileKeys * dim);
    grow(v, kTileKeys * dim), grow(kt, q_rows > 4 ? kTileKeys * dim : 0), grow(row_max, q_rows), grow(row_sum, q_rows);
    grow(q_panels, q_rows * dim), grow(k_rows, kTileKeys), grow(v_rows, kTileKeys),
    grow(slot_rows, kTileKeys), grow(k_first, kTileKeys);
    grow(v_first, kTileKeys), grow(k_head_stride, kTileKeys), grow(v_head_stride, kTileKeys), grow(key_pos, kTileKeys);
    grow(key_bits, kTileKeys);
  }
};

template <typename T>
class BlockSparseAttention {
 public:
  BlockSparseAttention(const Problem& p, const T* q, const T* k, const T* v, const T* new_k, const T* new_v, T* out,
                       float* lse, int64_t lse_stride, float* partial_out, float* partial_lse)
      : p_(p), q_(q), k_(k), v_(v), new_k_(new_k), new_v_(new_v), out_(out), lse_(lse), lse_stride_(lse_stride),
        partial_out_(partial_out), partial_lse_(partial_lse) {}

  void run(const WorkItem& item, Scratch& w) const {
    const int64_t group = p_.q_heads / p_.kv_heads;
    const int64_t b = item.seq, kvh = item.head0 / group, dim = p_.dim, kv_count = item.kv_count;
    const int64_t span = item.span;
    BlockGeometry g[kMaxSpan];
    for (int64_t i = 0; i < span; ++i) g[i] = geometry(p_, b, item.q_block + i);
    const int64_t rows = g[0].rows, key_end = g[span - 1].key_end;  // stacked blocks are full: equal rows
    const int64_t m = item.heads * span * rows;  // Q tile of one KV group: [head][query block][row]

    std::fill(w.row_max.begin(), w.row_max.begin() + kv_count * m, kNegInf);
    std::fill(w.row_sum.begin(), w.row_sum.begin() + kv_count * m, 0.0f);
    std::fill(w.acc.begin(), w.acc.begin() + kv_count * m * dim, 0.0f);
    for (int64_t c = 0; c < kv_count; ++c) {  // KV group c's rows follow group c - 1's
      for (int64_t j = 0; j < item.heads; ++j) {
        to_float(q_ + g[0].q_start * p_.q_stride_t + (item.head0 + c * group + j) * p_.q_stride_h, p_.q_stride_t,
                 span * rows, dim, p_.scale * kLog2e, w.q.data() + (c * m + j * span * rows) * dim);
      }
      if (p_.tall && m > 4) to_row_panels(w.q.data() + c * m * dim, dim, m, dim, w.q_panels.data() + c * m * dim);
    }

    // The blocks to read: one mask row, or the union of the stacked rows with their membership bits.
    MaskRow row = mask_row(p_, b, item.head0, item.q_block);
    const uint8_t* member = nullptr;
    const int64_t units = item.units();
    if (units > 1) {
      MaskRow rows_of[kMaxUnits];
      for (int64_t u = 0; u < units; ++u) rows_of[u] = mask_row(p_, b, item.head0 + u / span, item.q_block + u % span);
      merge_rows(rows_of, units, w.union_blocks, w.union_bits);
      row = {static_cast<int64_t>(w.union_blocks.size()), w.union_blocks.data(), 1};
      member = w.union_bits.data();
    }
    const uint8_t all = uint8_t((1u << units) - 1);

    // Where keys come from: the cache (varlen rows or pages; packed slots with KV pruning) or the fresh tokens.
    struct Source {
      const T* k;
      const T* v;
      int64_t k_stride, v_stride;
      bool pruned;
      int64_t k_head_stride, v_head_stride;
    };
    const Source cached{k_ + kvh * p_.k_stride_h, v_ + kvh * p_.v_stride_h, p_.k_stride_t, p_.v_stride_t,
                        p_.slot_keep > 0, p_.k_stride_h, p_.v_stride_h};
    const Source fresh{p_.has_fresh ? new_k_ + kvh * p_.nk_stride_h : nullptr,
                       p_.has_fresh ? new_v_ + kvh * p_.nv_stride_h : nullptr, p_.nk_stride_t, p_.nv_stride_t, false,
                       p_.nk_stride_h, p_.nv_stride_h};
    const int64_t fresh_from = p_.fresh_start(b), fresh_row0 = p_.has_fresh ? p_.cu_q[b] - fresh_from : 0;
    // Short Q tiles (decode: the heads of one KV group, one row each) read fp32 keys and values where they lie,
    // through one pointer per key: a product of so few rows is bound by the bytes of K and V, which a copy into the
    // tile would read twice. So do tall tiles whose products run on the AVX-512 register tiles (they take rows
    // through pointers: scattered small blocks are not copied); for the BLAS products, short runs are copied into
    // the tile.
    const bool direct = std::is_same_v<T, float> && (m <= kDirectMaxRows || (p_.tall && tall_products_fast(dim)));
    int64_t gathered = 0;  // keys waiting in the tile
    // Pruned fp32 slots of a short Q tile (AVX-512): gathered as slot pointers (k_rows, with v_rows null) and
    // unpacked when the tile is full, the slots 16 keys ahead prefetched: a page holds few keys, so only the tile's
    // pointer list sees far enough ahead.
    const bool unpack_late = direct && cached.pruned && unpack_kv_slot_fast(p_.dim);
    auto flush = [&] {
      if (gathered == 0) return;
      if (direct && kv_count > 1) {  // the tile's keys for every KV group in turn: the same rows, other columns
        std::copy(w.k_rows.begin(), w.k_rows.begin() + gathered, w.k_first.begin());
        std::copy(w.v_rows.begin(), w.v_rows.begin() + gathered, w.v_first.begin());
        // Every KV group reads other columns of the same rows, one strided pass each: the rows are first read
        // once as a sequential stream (one load per cache line), which the hardware prefetchers follow, so those
        // passes find them in L2.
        for (int64_t i = 0; i < gathered; ++i) w.sink += touch_lines(w.k_first[i], kv_count * w.k_head_stride[i]);
        for (int64_t c = 0; c < kv_count; ++c) {
          for (int64_t i = 0; i < gathered; ++i) {
            w.k_rows[i] = w.k_first[i] + c * w.k_head_stride[i];
            w.v_rows[i] = w.v_first[i] == nullptr ? nullptr : w.v_first[i] + c * w.v_head_stride[i];
          }
          if (unpack_late) unpack_tile(gathered, m, w);
          tile(item, g, gathered, RowsOf(w.k_rows.data()), RowsOf(w.v_rows.data()), w, c * m);
        }
      } else if (direct) {
        if (unpack_late) unpack_tile(gathered, m, w);
        tile(item, g, gathered, RowsOf(w.k_rows.data()), RowsOf(w.v_rows.data()), w, 0);
      } else {
        tile(item, g, gathered, RowsOf(w.k.data(), dim), RowsOf(w.v.data(), dim), w, 0);
      }
      gathered = 0;
    };
    // Physical runs of the kept keys: logical keys [start, start + len) in rows [row, row + len) of one source,
    // with one membership set.
    int64_t run_start = 0, run_len = 0, run_row = 0;
    uint8_t run_bits = all;
    const Source* run_src = &cached;
    auto consume = [&] {
      if (run_len == 0) return;
      const Source& src = *run_src;
      if constexpr (std::is_same_v<T, float>) {
        if (direct && (!src.pruned || unpack_late)) {
          for (int64_t off = 0; off < run_len; ++off) {
            w.k_rows[gathered] = src.k + (run_row + off) * src.k_stride;
            w.v_rows[gathered] = src.pruned ? nullptr : src.v + (run_row + off) * src.v_stride;
            w.k_head_stride[gathered] = src.k_head_stride;
            w.v_head_stride[gathered] = src.v_head_stride;
            w.key_pos[gathered] = run_start + off;
            w.key_bits[gathered] = run_bits;
            if (++gathered == kTileKeys) flush();
          }
          run_len = 0;
          return;
        }
      }
      if (std::is_same_v<T, float> && !src.pruned && run_len >= kInPlaceMinKeys) {
        flush();  // the in-place tile reuses the position and membership buffers
        for (int64_t off = 0; off < run_len; off += kTileKeys) {
          const int64_t n = std::min(kTileKeys, run_len - off);
          std::iota(w.key_pos.begin(), w.key_pos.begin() + n, run_start + off);
          std::fill(w.key_bits.begin(), w.key_bits.begin() + n, run_bits);
          tile(item, g, n, RowsOf(reinterpret_cast<const float*>(src.k) + (run_row + off) * src.k_stride, src.k_stride),
               RowsOf(reinterpret_cast<const float*>(src.v) + (run_row + off) * src.v_stride, src.v_stride), w, 0);
        }
      } else {
        for (int64_t off = 0; off < run_len;) {
          const int64_t n = std::min(kTileKeys - gathered, run_len - off);
          const T* k_rows = src.k + (run_row + off) * src.k_stride;
          if (src.pruned) {
            unpack_slots(k_rows, src.k_stride, n, dim, p_.slot_keep, p_.bitmap_bytes, 0, w.k.data() + gathered * dim);
            unpack_slots(k_rows, src.k_stride, n, dim, p_.slot_keep, p_.bitmap_bytes, 1, w.v.data() + gathered * dim);
          } else {
            to_float(k_rows, src.k_stride, n, dim, 1.0f, w.k.data() + gathered * dim);
            to_float(src.v + (run_row + off) * src.v_stride, src.v_stride, n, dim, 1.0f, w.v.data() + gathered * dim);
          }
          std::iota(w.key_pos.begin() + gathered, w.key_pos.begin() + gathered + n, run_start + off);
          std::fill(w.key_bits.begin() + gathered, w.key_bits.begin() + gathered + n, run_bits);
          for (int64_t i = gathered; direct && i < gathered + n; ++i) {  // unpacked slots, read through pointers
            w.k_rows[i] = w.k.data() + i * dim;
            w.v_rows[i] = w.v.data() + i * dim;
          }
          gathered += n;
          off += n;
          if (gathered == kTileKeys) flush();
        }
      }
      run_len = 0;
    };
    for (int64_t slot = item.slot_begin; slot < item.slot_end; ++slot) {
      int64_t t = row[slot] * p_.kv_block;
      const int64_t end = std::min(t + p_.kv_block, key_end);
      const uint8_t bits = member ? member[slot] : all;
      while (t < end) {  // blocks past the sequence or wholly in the causal future give an empty range
        const bool is_fresh = t >= fresh_from;
        const Source* src = is_fresh ? &fresh : &cached;
        const int64_t stop = is_fresh ? end : p_.run_end(b, t, std::min(end, fresh_from));
        const int64_t phys = is_fresh ? fresh_row0 + t : p_.key_row(b, t);
        if (run_len > 0 && src == run_src && t == run_start + run_len && phys == run_row + run_len &&
            bits == run_bits) {
          run_len += stop - t;  // continues the current run
        } else {
          consume();
          run_start = t, run_row = phys, run_len = stop - t, run_bits = bits, run_src = src;
        }
        t = stop;
      }
    }
    consume();
    flush();
    for (int64_t c = 0; c < kv_count; ++c) {
      for (int64_t j = 0; j < item.heads; ++j) {
        for (int64_t i = 0; i < span; ++i) finish(item, g[i], item.head0 + c * group + j, c * m + (j * span + i) * rows, w);
      }
    }
  }

 private:
  // Unpacks the tile's pruned slots (keys whose v_rows entry is null; k_rows holds the slot) into the scratch rows.
  // Short Q tiles (m <= kDirectMaxRows: decode) unpack nothing: their score and P V products expand each slot's K
  // and V halves in registers (gemm_abt_slots, gemm_ab_acc_slots), so no slot is stored and read back; the slots
  // stay in w.slot_rows (k_rows and v_rows null) and w.slot_keys says the tile has some.
  void unpack_tile(int64_t n, int64_t m, Scratch& w) const {
    constexpr int64_t kLookahead = 16;
    const int64_t dim = p_.dim, slot_bytes = int64_t{sizeof(T)} * (2 * p_.slot_keep) + 2 * p_.bitmap_bytes;
    const bool in_registers = m <= kDirectMaxRows && ab_acc_slots_fast(dim);
    w.slot_keys = false;
    for (int64_t i = 0; i < n; ++i) {
      if (i + kLookahead < n && w.v_rows[i + kLookahead] == nullptr) {
        prefetch_bytes(w.k_rows[i + kLookahead], slot_bytes + 63);  // + 63: a slot may straddle one more line
      }
      if (w.v_rows[i] != nullptr) continue;
      const float* slot = reinterpret_cast<const float*>(w.k_rows[i]);
      if (in_registers) {  // k_rows and v_rows null: both halves read from the slot
        w.slot_rows[i] = slot;
        w.k_rows[i] = nullptr;
        w.slot_keys = true;
      } else {
        float* k = w.k.data() + i * dim;
        float* v = w.v.data() + i * dim;
        unpack_kv_slot(slot, dim, p_.slot_keep, k, v);
        w.k_rows[i] = k;
        w.v_rows[i] = v;
      }
    }
  }

  // One tile of n keys (rows of k/v with leading dimensions ldk/ldv; logical positions in w.key_pos, ascending;
  // the stacked query blocks that keep each key in w.key_bits) for the item's Q tile.
  // The Q tile and its softmax state start at row `row0` of the scratch (the item's KV group).
  void tile(const WorkItem& item, const BlockGeometry* g, int64_t n, RowsOf k, RowsOf v, Scratch& w,
            int64_t row0) const {
    const int64_t span = item.span, rows = g[0].rows, m = item.heads * span * rows, dim = p_.dim;
    const bool slots = w.slot_keys;  // set by unpack_tile for this tile only
    w.slot_keys = false;
    float* s = w.s.data();
    // Scores: from the keys packed once per call where the tile's runs start on chunks, else from its own keys.
    const float* chunks = p_.key_chunks == nullptr ? nullptr
        : p_.key_chunks + p_.chunk_base[item.seq * p_.kv_heads + item.head0 / (p_.q_heads / p_.kv_heads)];
    if (slots) {  // pruned K halves expanded in registers (unpack_tile)
      gemm_abt_slots(m, n, dim, p_.slot_keep, w.q.data() + row0 * dim, dim, k.ptrs, w.slot_rows.data(), s, kTileKeys);
    } else if (chunks == nullptr ||
               !gemm_abt_chunks(m, n, dim, w.q_panels.data() + row0 * dim, chunks, w.key_pos.data(), s, kTileKeys)) {
      gemm_abt(p_.blas, m, n, dim, w.q.data() + row0 * dim, dim, k, s, kTileKeys, p_.tall ? w.kt.data() : nullptr,
               w.q_panels.data() + row0 * dim);
    }
    const int64_t units = item.units();
    for (int64_t i = 0; i < span; ++i) {
      const bool causal = p_.causal && w.key_pos[n - 1] > g[i].first_pos;  // the tile reaches past the first query
      for (int64_t j = 0; j < item.heads; ++j) {
        const uint8_t bit = uint8_t(1u << (item.per_head ? j * span + i : i));
        bool foreign = false;  // keys of the tile that this row (head j, query block i) does not keep
        for (int64_t c = 0; c < n && units > 1 && !foreign; ++c) foreign = !(w.key_bits[c] & bit);
        if (!causal && !foreign) continue;
        float* sub = s + (j * span + i) * rows * kTileKeys;
        if (causal) mask_causal(sub, kTileKeys, rows, n, w.key_pos.data(), g[i].first_pos);
        if (foreign) mask_members(sub, kTileKeys, rows, n, w.key_bits.data(), bit);
      }
    }
    ++w.tiles;
    if (!softmax_update(s, kTileKeys, m, n, w.row_max.data() + row0, w.row_sum.data() + row0,
                        w.acc.data() + row0 * dim, dim, p_.skip)) {
      ++w.skipped;
      return;
    }
    if (slots) {  // pruned V halves expanded in registers (unpack_tile)
      gemm_ab_acc_slots(m, n, dim, p_.slot_keep, s, kTileKeys, v.ptrs, w.slot_rows.data(), w.acc.data() + row0 * dim,
                        dim);
    } else {
      gemm_ab_acc(p_.blas, m, dim, n, s, kTileKeys, v, w.acc.data() + row0 * dim, dim, p_.tall);
    }
  }

  // Writes out = acc / l and lse for the rows of query block g of head h, held at row `tile_row` of the Q tile: into
  // the output, or into the partial buffers for a slice of a split row.
  void finish(const WorkItem& item, const BlockGeometry& g, int64_t h, int64_t tile_row, const Scratch& w) const {
    const int64_t dim = p_.dim;
    for (int64_t r = 0; r < g.rows; ++r) {
      const float l = w.row_sum[tile_row + r];
      const float* acc = w.acc.data() + (tile_row + r) * dim;
      // l == 0: the row read no key; a NaN l (NaN or +inf scores) makes out and lse NaN.
      const float inv = l == 0.0f ? 0.0f : 1.0f / l;
      const float lse = l == 0.0f ? kNegInf : (w.row_max[tile_row + r] + std::log2(l)) * kLn2;
      if (item.partial >= 0) {
        const int64_t at = slot(item, (h - item.head0) * g.rows + r);
        float* o = partial_out_ + at * dim;
        for (int64_t e = 0; e < dim; ++e) o[e] = acc[e] * inv;
        partial_lse_[at] = lse;
        continue;
      }
      T* o = out_ + (g.q_start + r) * p_.out_stride_t + h * p_.out_stride_h;
      for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<T>(acc[e] * inv);
      lse_[h * lse_stride_ + g.q_start + r] = lse;
    }
  }

 public:
  // Merges the slices [first, last) of one split row (consecutive partial indices) into the output.
  void merge(const std::vector<WorkItem>& items, int64_t first, int64_t last) const {
    const WorkItem& item = items[first];
    const BlockGeometry g = geometry(p_, item.seq, item.q_block);
    const int64_t dim = p_.dim;
    std::vector<float> acc(dim);
    for (int64_t j = 0; j < item.heads * item.kv_count; ++j) {  // an item's heads are consecutive
      for (int64_t r = 0; r < g.rows; ++r) {
        const int64_t local = j * g.rows + r;
        float top = kNegInf;
        bool nan = false;  // a NaN slice (std::max skips it) makes the merged row NaN
        for (int64_t s = first; s < last; ++s) {
          const float part = partial_lse_[slot(items[s], local)];
          top = std::max(top, part);
          nan |= part != part;
        }
        T* o = out_ + (g.q_start + r) * p_.out_stride_t + (item.head0 + j) * p_.out_stride_h;
        float* lse = lse_ + (item.head0 + j) * lse_stride_ + g.q_start + r;
        if (top == kNegInf && !nan) {
          std::fill(o, o + dim, static_cast<T>(0.0f));
          *lse = kNegInf;
          continue;
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        float total = 0.0f;
        for (int64_t s = first; s < last; ++s) {
          const int64_t at = slot(items[s], local);
          const float weight = std::exp(partial_lse_[at] - top);
          total += weight;
          const float* part = partial_out_ + at * dim;
          for (int64_t e = 0; e < dim; ++e) acc[e] += weight * part[e];
        }
        for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<T>(acc[e] / total);
        *lse = top + std::log(total);
      }
    }
  }

 private:
  int64_t slot(const WorkItem& item, int64_t local) const {
    return int64_t{item.partial} * p_.max_rows * p_.q_heads + local;
  }

  Problem p_;
  const T* q_;
  const T* k_;
  const T* v_;
  const T* new_k_;
  const T* new_v_;
  T* out_;
  float* lse_;
  int64_t lse_stride_;
  float* partial_out_;
  float* partial_lse_;
};

// The number of blocks in the union of `span` sorted mask rows.
int64_t union_count(const MaskRow* rows, int64_t span) {
  int64_t count = 0;
  for_union(rows, span, [&count](int64_t, uint8_t) { ++count; });
  return count;
}

// Work items, most expensive first: threads take them from a shared counter, which balances causal prefill (cost
// grows with the query block) and ragged batches better than equal static ranges. Short Q tiles (one head of a
// small block) stack the following query blocks of the same heads while the union of their rows stays close to
// what they read alone. When there are fewer items than kItemsPerThread per thread, long rows are split into
// slices of at least kMinSplitKeys keys (flash-decoding).
std::vector<WorkItem> work_items(const Problem& p, int64_t threads, int64_t* num_partials, bool* serial) {
  const int64_t group = p.q_heads / p.kv_heads;
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q_len = p.cu_q[b + 1] - p.cu_q[b];
    const int64_t nq = (q_len + p.q_block - 1) / p.q_block;
    const int64_t full = q_len / p.q_block;  // query blocks of q_block rows (only those are stacked)
    if (p.all_kv_heads) {  // one item per query block for every head (they share one mask row)
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t rows = std::min(p.q_block, q_len - i * p.q_block), count = mask_row(p, b, 0, i).count;
        items.push_back({(count * p.kv_block + 1) * rows * p.q_heads, static_cast<int32_t>(b), static_cast<int32_t>(i),
                         1, 0, static_cast<int32_t>(group), 0, static_cast<int32_t>(count), -1,
                         static_cast<int32_t>(p.kv_heads)});
      }
      continue;
    }
    for (int64_t gq = 0; gq < p.kv_heads; ++gq) {
      const int64_t h0 = gq * group;
      for (int64_t i = 0; i < nq;) {
        const int64_t rows = std::min(p.q_block, q_len - i * p.q_block);
        const MaskRow first = mask_row(p, b, h0, i);
        bool shared = true;
        for (int64_t j = 1; j < group && shared; ++j) shared = mask_row(p, b, h0 + j, i) == first;
        // Heads with different rows share one tile while the union costs little more than the rows alone.
        if (!shared && !p.dense() && group <= kMaxUnits) {
          MaskRow rows_of[kMaxUnits];
          int64_t alone = 0;
          for (int64_t j = 0; j < group; ++j) {
            rows_of[j] = mask_row(p, b, h0 + j, i);
            alone += rows_of[j].count;
          }
          const int64_t count = union_count(rows_of, group);
          if (count * group <= kMaxHeadUnionOverhead * alone) {
            WorkItem item{(count * p.kv_block + 1) * rows * group, static_cast<int32_t>(b), static_cast<int32_t>(i),
                          1, static_cast<int32_t>(h0), static_cast<int32_t>(group), 0, static_cast<int32_t>(count),
                          -1, 1};
            item.per_head = true;
            items.push_back(item);
            ++i;
            continue;
          }
        }
        const int64_t heads = shared ? group : 1;
        // Stack query blocks (only where every head set of this block shares its layout: shared rows, or one head
        // per item for the whole group), same for all head sets of the group.
        int64_t span = 1;
        if (!p.dense() && i < full) {
          const int64_t want = std::min<int64_t>(kMaxSpan, (kTargetTileRows + heads * rows - 1) / (heads * rows));
          while (span < want && i + span < full) {
            bool ok = true;
            for (int64_t h = h0; h < h0 + group && ok; h += heads) {
              MaskRow rows_of[kMaxSpan];
              int64_t alone = 0;
              for (int64_t s = 0; s <= span; ++s) {
                rows_of[s] = mask_row(p, b, h, i + s);
                alone = std::max(alone, rows_of[s].count);
              }
              // Heads sharing block i must share the stacked blocks too.
              for (int64_t j = 1; j < heads && ok; ++j) ok = mask_row(p, b, h + j, i + span) == rows_of[span];
              ok = ok && union_count(rows_of, span + 1) <= kMaxUnionOverhead * alone;
            }
            if (!ok) break;
            ++span;
          }
        }
        for (int64_t h = h0; h < h0 + group; h += heads) {
          int64_t count = 0;
          if (span == 1) {
            count = mask_row(p, b, h, i).count;
          } else {
            MaskRow rows_of[kMaxSpan];
            for (int64_t s = 0; s < span; ++s) rows_of[s] = mask_row(p, b, h, i + s);
            count = union_count(rows_of, span);
          }
          items.push_back({(count * p.kv_block + 1) * rows * heads * span, static_cast<int32_t>(b),
                           static_cast<int32_t>(i), static_cast<int32_t>(span), static_cast<int32_t>(h),
                           static_cast<int32_t>(heads), 0, static_cast<int32_t>(count), -1, 1});
        }
        i += span;
      }
    }
  }
  *num_partials = 0;
  int64_t total = 0, keys = 0;
  for (const WorkItem& item : items) {
    total += item.cost;
    keys += int64_t{item.slot_end} * p.kv_block;
  }
  *serial = threads == 1 || (total < kSerialCost && keys < kSerialKeys);
  const int64_t target = threads * kItemsPerThread;
  if (!*serial && static_cast<int64_t>(items.size()) < target) {
    std::vector<WorkItem> split;
    // Pieces per item: enough for `target` items, rounded up so that the threads get equal numbers of pieces.
    const int64_t n = static_cast<int64_t>(items.size());
    int64_t per_item = (target + n - 1) / n;
    while ((n * per_item) % threads != 0) ++per_item;  // ends within `threads` steps
    for (const WorkItem& item : items) {
      const int64_t count = item.slot_end;
      const int64_t by_size = count * p.kv_block / kMinSplitKeys;
      const int64_t pieces = item.units() > 1 ? 1 : std::max<int64_t>(1, std::min(per_item, by_size));
      if (pieces == 1) {
        split.push_back(item);
        continue;
      }
      for (int64_t s = 0; s < pieces; ++s) {
        WorkItem piece = item;
        piece.slot_begin = static_cast<int32_t>(count * s / pieces);
        piece.slot_end = static_cast<int32_t>(count * (s + 1) / pieces);
        piece.cost = item.cost / pieces;
        piece.partial = static_cast<int32_t>((*num_partials)++);
        split.push_back(piece);
      }
    }
    items.swap(split);
  }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& x, const WorkItem& y) { return x.cost > y.cost; });
  return items;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_cpu(const BlockSparseAttentionInputs& in) {
  const auto& q = in.q;
  const int64_t total_q = q.size(0), q_heads = q.size(1), dim = q.size(2);
  auto out = at::empty({total_q, q_heads, dim}, q.options());
  auto lse = at::empty({q_heads, total_q}, q.options().dtype(at::kFloat));
  auto stats = at::zeros({2}, q.options().dtype(at::kLong));  // tiles computed, tiles skipped
  if (total_q == 0) return {out, lse, stats};

  Problem p{};
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
  p.kv_lens = in.kv_lens.data_ptr<int32_t>();
  if (in.block_table.defined()) {
    p.block_table = in.block_table.data_ptr<int32_t>();
    p.table_stride = in.block_table.stride(0);
    p.page_size = in.page_size;
  } else {
    p.cu_k = in.cu_seqlens_k.data_ptr<int32_t>();
  }
  if (in.kv_num_blocks.defined()) {
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
    p.mask_head_div = nb.size(1) == 1 ? 1 : q_heads / nb.size(1);
  }
  p.slot_keep = in.slot_keep;
  p.bitmap_bytes = (dim + 7) / 8;
  if (in.new_k.defined()) {
    p.has_fresh = true;
    p.nk_stride_t = in.new_k.stride(0);
    p.nk_stride_h = in.new_k.stride(1);
    p.nv_stride_t = in.new_v.stride(0);
    p.nv_stride_h = in.new_v.stride(1);
  }
  p.q_block = in.q_block_size;
  p.kv_block = in.kv_block_size;
  p.max_rows = 0;
  for (int64_t b = 0; b < p.batch; ++b) p.max_rows = std::max<int64_t>(p.max_rows, p.cu_q[b + 1] - p.cu_q[b]);
  p.max_rows = std::min(p.max_rows, p.q_block);
  // Items over all KV heads: short Q tiles read in place (fp32; pruned slots unpacked per tile), one mask row for
  // every head, and rows holding the KV heads of a key side by side (a head's stride below a key's).
  const int64_t group = q_heads / p.kv_heads;
  p.all_kv_heads = q.scalar_type() == at::kFloat && p.kv_heads > 1 && p.max_rows * group <= kDirectMaxRows &&
                   (in.kv_num_blocks.defined() ? in.kv_num_blocks.size(1) == 1 : true) &&
                   p.k_stride_h < p.k_stride_t && (p.slot_keep == 0 || unpack_kv_slot_fast(dim));
  p.causal = in.causal;
  p.scale = static_cast<float>(in.scale);
  p.skip = in.skip_threshold > 0 ? static_cast<float>(in.skip_threshold * kLog2e)
                                  : std::numeric_limits<float>::infinity();
  p.blas = in.use_blas && sgemm_ != nullptr;
  p.tall = in.use_blas;

  // fp32 prefill on AVX-512: the keys packed once (chunks of 16 positions; pruned slots unpacked, the step's own
  // tokens from new_k), read in place by every tile's score products where its runs of keys start on a chunk
  // (blocks of a multiple of 16 keys), so no tile transposes (or unpacks) its keys: a key read by several query
  // blocks or heads is packed once, not once per tile.
  std::vector<int64_t> chunk_base;
  std::unique_ptr<float[]> key_chunks;
  if (q.scalar_type() == at::kFloat && p.tall && tall_products_fast(dim) && !p.all_kv_heads &&
      p.kv_block % 16 == 0 && p.max_rows * group > 4) {
    chunk_base.resize(p.batch * p.kv_heads);
    int64_t total = 0;
    for (int64_t bh = 0; bh < p.batch * p.kv_heads; ++bh) {
      chunk_base[bh] = total;
      total += (int64_t{p.kv_lens[bh / p.kv_heads]} + 15) / 16 * 16 * dim;
    }
    key_chunks.reset(new float[std::max<int64_t>(total, 1)]);
    const float* k = in.k.data_ptr<float>();
    const float* new_k = p.has_fresh ? in.new_k.data_ptr<float>() : nullptr;
    at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
      const float* rows[16];
      std::vector<float> unpacked(p.slot_keep > 0 ? 16 * dim : 0);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p.kv_heads, h = bh % p.kv_heads, len = p.kv_lens[b], fresh = p.fresh_start(b);
        for (int64_t t0 = 0; t0 < len; t0 += 16) {
          const int64_t live = std::min<int64_t>(16, len - t0);
          for (int64_t i = 0, t = t0; i < live; ++i, ++t) {
            if (t >= fresh) {
              rows[i] = new_k + (p.cu_q[b] + t - fresh) * p.nk_stride_t + h * p.nk_stride_h;
            } else if (p.slot_keep > 0) {
              unpack_slots(k + p.key_row(b, t) * p.k_stride_t + h * p.k_stride_h, p.k_stride_t, 1, dim,
                           p.slot_keep, p.bitmap_bytes, 0, unpacked.data() + i * dim);
              rows[i] = unpacked.data() + i * dim;
            } else {
              rows[i] = k + p.key_row(b, t) * p.k_stride_t + h * p.k_stride_h;
            }
          }
          pack_key_chunk(RowsOf(rows), live, dim, key_chunks.get() + chunk_base[bh] + t0 * dim);
        }
      }
    });
    p.key_chunks = key_chunks.get();
    p.chunk_base = chunk_base.data();
  }

  const int64_t threads = at::get_num_threads();
  int64_t num_partials = 0;
  bool serial = false;
  const std::vector<WorkItem> items = work_items(p, threads, &num_partials, &serial);
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t workers = serial ? 1 : std::max<int64_t>(1, std::min<int64_t>(threads, num_items));
  // Buffers are sized by the rows that exist (a group's heads times the stacked query blocks for the Q tile, or
  // every head's rows for items over all KV heads), so a decode call with large query blocks does not clear
  // megabytes it never touches.
  std::vector<float> partial_out(num_partials * p.max_rows * q_heads * dim), partial_lse(num_partials * p.max_rows * q_heads);
  const int64_t tile_rows = p.max_rows * std::max(q_heads / p.kv_heads * kMaxSpan, p.all_kv_heads ? q_heads : 0);
  std::atomic<int64_t> tiles{0}, skipped{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "block_sparse_attention_cpu", [&] {
    const scalar_t* new_k = p.has_fresh ? in.new_k.data_ptr<scalar_t>() : nullptr;
    const scalar_t* new_v = p.has_fresh ? in.new_v.data_ptr<scalar_t>() : nullptr;
    const BlockSparseAttention<scalar_t> op(p, q.data_ptr<scalar_t>(), in.k.data_ptr<scalar_t>(),
                                            in.v.data_ptr<scalar_t>(), new_k, new_v, out.data_ptr<scalar_t>(),
                                            lse.data_ptr<float>(), lse.stride(0), partial_out.data(),
                                            partial_lse.data());
    std::atomic<int64_t> next{0};
    auto worker = [&](int64_t, int64_t) {
      Scratch& scratch = Scratch::local(tile_rows, dim);
      for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) op.run(items[i], scratch);
      tiles += scratch.tiles;
      skipped += scratch.skipped;
    };
    if (workers == 1) {
      worker(0, 1);  // small calls (short decode rows) stay on the calling thread: no parallel region to wake
    } else {
      at::parallel_for(0, workers, 1, worker);
    }
    if (num_partials > 0) {  // slices of one split row have consecutive partial indices
      std::vector<WorkItem> slices;
      for (const WorkItem& item : items) {
        if (item.partial >= 0) slices.push_back(item);
      }
      std::sort(slices.begin(), slices.end(), [](const WorkItem& x, const WorkItem& y) { return x.partial < y.partial; });
      for (size_t first = 0; first < slices.size();) {
        size_t last = first + 1;
        while (last < slices.size() && slices[last].seq == slices[first].seq &&
               slices[last].q_block == slices[first].q_block && slices[last].head0 == slices[first].head0) {
          ++last;
        }
        op.merge(slices, first, last);
        first = last;
      }
    }
  });
  stats.data_ptr<int64_t>()[0] = tiles.load();
  stats.data_ptr<int64_t>()[1] = skipped.load();
  return {out, lse, stats};
}

}  // namespace sparse_attn
