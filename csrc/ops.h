// The extension's operators, one declaration per (op, device). bindings.cpp checks every argument once and then
// dispatches on the device; the implementations below may assume valid, contiguous inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ordered_key.h"

namespace sparse_attn {

// write_slots(dst [S, H, W], slots int64 [n], srcs: tensors [T >= n, H, W_j] with sum(W_j) == W, same dtype; unit
// stride along the last axis): dst[slots[i]] = cat(srcs[j][i] along the last axis) for slots[i] >= 0 (negative
// slots are padding), in place (e.g. a token's K and V into one page slot, one pass). With label_src [T >= n, H, D]
// and channels int64 [H, r], the last r columns of head h take label_src[i, h, channels[h]]: K, V and the key's
// Double Sparsity label in one pass.
void write_slots_cpu(at::Tensor& dst, const at::Tensor& slots, const std::vector<at::Tensor>& srcs,
                     const at::Tensor& label_src = {}, const at::Tensor& channels = {});

// write_pruned_slots(dst [S, H, W], slots int64 [n], k/v [T >= n, H, D] in dst's dtype, keep): slot slots[i] of
// head h gets K's and V's `keep` largest-magnitude values (channel order; ties: the lower channel), then their keep
// bitmaps (D bits each, bit c % 8 of byte c / 8), zero-padded to W (the layout of PrunedSlotFormat).
void write_pruned_slots_cpu(at::Tensor& dst, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v,
                            int64_t keep);

// topk_tokens(scores [B, H, L] fp32, lengths int32 [B], k, sink, recent, budgets int32 [B] or none):
// row (b, h) selects budget = min(budgets[b], k) (without budgets: k) of its first len = lengths[b] tokens: all of
// them if len <= budget, else the sink tokens [0, sink), the recent tokens [len - recent, len) (sink + recent <= k)
// and, for the rest of the budget, the other tokens with the highest scores (ties: the lower index). Output:
// indices int32 [B, H, k] ascending, zero-padded past counts int32 [B, H].
std::tuple<at::Tensor, at::Tensor> topk_tokens_cpu(const at::Tensor& scores, const at::Tensor& lengths, int64_t k,
                                                   int64_t sink, int64_t recent,
                                                   const std::optional<at::Tensor>& budgets);

// Inputs of the compressed-cache decode (layout documented in sparse_attn/decode/compressed.py):
//   q [B, Hq, D]; per K and V: bitmaps int64 [slots * tiles], values [slots * keep], keep kept values per token;
//   offsets int64 [B, Hkv] (first slot of (b, h)), comp_lengths int32 [B] (compressed tokens per sequence);
//   dense recent window k_recent/v_recent [B, Hkv, W, D] with recent_lengths int32 [B].
// A sequence's context is its compressed tokens followed by its recent tokens.
struct CompressedDecodeInputs {
  at::Tensor q;
  at::Tensor k_bitmaps, k_values;
  at::Tensor v_bitmaps, v_values;
  int64_t k_keep = 0, v_keep = 0;
  at::Tensor offsets, comp_lengths;
  at::Tensor k_recent, v_recent, recent_lengths;
  double scale = 1.0;
  int64_t max_context = 0;  // upper bound on comp_lengths + recent_lengths (0: unknown); sizes the CUDA split grid
};

// Returns (out [B, Hq, D] in q's dtype, lse fp32 [B, Hq]; out 0 and lse -inf for an empty context).
std::tuple<at::Tensor, at::Tensor> compressed_decode_attention_cpu(const CompressedDecodeInputs& in);

// Inputs of block-sparse attention (semantics in sparse_attn/ops/attention.py): varlen q [Tq, Hq, D] with
// cu_seqlens_q int32 [B + 1]; keys in one of two layouts, k/v [rows, Hkv, D] (any token and head strides, unit
// stride along D):
//   varlen: cu_seqlens_k int32 [B + 1], key t of sequence b at row cu_seqlens_k[b] + t;
//   paged:  block_table int32 [B, max_pages] and page_size, key t of sequence b at row
//           block_table[b, t / page_size] * page_size + t % page_size (a page tensor viewed as rows of slots);
// kv_lens int32 [B] the keys of each sequence. With slot_keep > 0 the cached rows are KV-pruned slots (k holds
// them, [rows, Hkv, width]: K's slot_keep kept values, V's, then the two ceil(D / 8)-byte keep bitmaps; v is k).
// new_k/new_v [Tq, Hkv, D] (optional, aligned with q): the step's own tokens, read for positions
// [kv_len - q_len, kv_len) instead of the cache. The mask rows kv_num_blocks int32 [B or 1, Hq, Hkv or 1, nq] and
// kv_indices int32 [.., nq, W] (size-1 dims broadcast; Hkv: one row per GQA group); undefined: every block (dense).
// Queries are the last q_len positions of each context; query head h reads KV head h / (Hq / Hkv).
struct BlockSparseAttentionInputs {
  at::Tensor q, k, v;
  at::Tensor cu_seqlens_q, cu_seqlens_k, kv_lens;
  at::Tensor block_table;  // undefined: varlen keys
  int64_t page_size = 0;
  int64_t slot_keep = 0;         // > 0: pruned slots
  at::Tensor new_k, new_v;       // undefined: every key from the cache
  at::Tensor kv_num_blocks, kv_indices;  // undefined: dense
  int64_t q_block_size = 1, kv_block_size = 1;
  bool causal = true;
  double scale = 1.0;
  double skip_threshold = 0.0;  // > 0: skip tiles whose scores all lie this far (natural log) below the row maxima
  bool use_blas = true;  // false: the portable vectorized loops even where torch carries a BLAS or the CPU AVX-512 (tests)
};

// Returns (out [Tq, Hq, D] in q's dtype, lse fp32 [Hq, Tq] natural log; out 0 and lse -inf for rows with no key;
// stats int64 [2]: key tiles computed and tiles skipped by the threshold).
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_cpu(const BlockSparseAttentionInputs& in);

// Inputs of the decode token selection (Double Sparsity, exact top-k): q [B, Hq, D]; labels [rows, Hkv, W] the
// page rows (any strides, unit along W) holding each token's label (its r channels of K) in the first r columns, or
// the key itself (r = D); with slot_keep > 0 the rows are KV-pruned slots whose K is unpacked (exact scores);
// channels int64 [Hkv, r] (q's channels per KV head); block_table int32 [B, max_pages], page_size, kv_lens int32
// [B]; budgets int32 [B] tokens kept per row (<= width). Row (b, KV head or query head) scores its tokens with
// q[channels] . label (per_group: reduced over the group's query heads, max or sum) and keeps the sink tokens, the
// recent tokens and the highest others (ties: the lower index); never more than `width` (sink first, then recent).
// Quantized labels (label_scales defined): labels hold int8 codes (int8 [rows, Hkv, >= r]) or int4 codes packed two
// per byte (uint8 [rows, Hkv, >= r / 2]: channel 2i in the low nibble, 2i + 1 in the high one, stored + 8), and
// label_scales fp16 [rows, Hkv] the per-(token, head) scale: a label is code * scale.
struct DecodeSelectInputs {
  at::Tensor q, labels, channels, block_table, kv_lens, budgets;
  at::Tensor label_scales;  // undefined: unquantized labels
  int64_t page_size = 1, width = 1, sink = 0, recent = 0, slot_keep = 0;
  bool per_group = true, reduce_max = true;
};

// Returns (indices int32 [B, Hkv or Hq, width] ascending, zero-padded past the count; counts int32 [B, Hkv or Hq]).
std::tuple<at::Tensor, at::Tensor> decode_select_cpu(const DecodeSelectInputs& in);

// Inputs of the pooled block scores (head-proxy estimation; semantics in sparse_attn/patterns/head_proxy.py):
// q [P, nq, R, D] the sampled query rows of P proxy heads (contiguous), k [Tk, Hk, D] (unit stride along D; proxy
// head p reads KV head p / (P / Hk)), pos int32 [nq, R] the rows' absolute positions (-1: an empty slot).
struct PooledBlockScoresInputs {
  at::Tensor q, k, pos;
  int64_t kv_block_size = 1;
  double scale = 1.0;
  bool causal = true;
  bool mean = false;  // false: max of the probabilities over the block; true: the block's mass, averaged over rows
  // The score products: "auto" (the fastest this CPU has for the head dim: "bf16", "int16" or "fp32"), "fp32"
  // (exact), "bf16" (q and k rounded to bf16, fp32 sums; AVX512-BF16) or "int16" (rows quantized to 16-bit
  // integers, int32 sums; AVX512-VNNI); "bf16" and "int16" need head dims that are multiples of 32.
  std::string products = "auto";
};

// Returns fp32 [P, nq, ceil(Tk / kv_block_size)].
at::Tensor pooled_block_scores_cpu(const PooledBlockScoresInputs& in);
// The products pooled_block_scores_cpu uses on this CPU for head dim `dim` under "auto": "bf16", "int16" or "fp32".
const char* estimate_products_cpu(int64_t dim);

// Inputs of the block selection that follows the pooled scores (semantics in HeadProxy.select): scores fp32
// [P, nq, nk]; budgets int64 [Hq] blocks per query block of each query head (>= 1); proxy_of_head int64 [Hq] in
// [0, P); bounds int64 [nq] visible blocks of each query block (j < bounds[i]); diag int64 [nq] the block kept with
// the sink (-1: none); query blocks i >= tail_from keep every block.
struct SelectBlocksInputs {
  at::Tensor scores, budgets, proxy_of_head, bounds, diag;
  int64_t tail_from = 0;
};

// Fills keep bool [Hq, nq, nk] (zeroed by the caller).
void select_blocks_cpu(const SelectBlocksInputs& in, at::Tensor& keep);
// The same selection as block rows, clipped to the visible blocks j < bounds[i]: counts int32 [Hq, nq] and indices
// int32 [Hq, nq, W] ascending (W the largest count, at least 1; zero past each count).
std::tuple<at::Tensor, at::Tensor> select_block_rows_cpu(const SelectBlocksInputs& in);

// block_rows(keep bool [..., nk], contiguous): counts int32 [...] the kept blocks of each row and indices int32
// [..., W] their ids ascending, zero past the count, W the largest count (at least 1).
std::tuple<at::Tensor, at::Tensor> block_rows_cpu(const at::Tensor& keep);

#ifdef SPARSE_ATTN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> topk_tokens_cuda(const at::Tensor& scores, const at::Tensor& lengths, int64_t k,
                                                    int64_t sink, int64_t recent,
                                                    const std::optional<at::Tensor>& budgets);
std::tuple<at::Tensor, at::Tensor> compressed_decode_attention_cuda(const CompressedDecodeInputs& in);
#endif

// 64-element tiles per token vector (the last one partial when head_dim is not a multiple of 64).
inline int64_t num_tiles(int64_t head_dim) { return (head_dim + 63) / 64; }

}  // namespace sparse_attn
