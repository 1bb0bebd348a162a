// sparse_attn._C: argument checks and device dispatch for every operator (CPU in csrc/cpu, CUDA in csrc/cuda).
// The Python wrappers in sparse_attn/ops/extension.py raise ValueError before reaching here; these checks guard
// direct calls, and every message names the argument.
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <utility>

#include "ops.h"

namespace sparse_attn {
namespace {

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, std::initializer_list<at::ScalarType> dtypes,
                  const at::Device& device) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have rank ", dim, ", got shape ", shape_of(t));
  bool dtype_ok = false;
  for (auto d : dtypes) dtype_ok |= t.scalar_type() == d;
  TORCH_CHECK(dtype_ok, name, " has unsupported dtype ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the first input is on ", device);
}

void check_size(const at::Tensor& t, const char* name, int64_t axis, int64_t expected, const char* what) {
  TORCH_CHECK(t.size(axis) == expected, name, " must have ", expected, " (", what, ") along axis ", axis,
              ", got shape ", shape_of(t));
}

// The slots as a contiguous int64 tensor, each below the number of rows of dst (negative slots are padding).
at::Tensor checked_slots(const at::Tensor& slots, const at::Tensor& dst) {
  auto s = slots.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.size(0); ++i) {
    TORCH_CHECK(p[i] < dst.size(0), "slots[", i, "] = ", p[i], " is past the cache's ", dst.size(0), " slots");
  }
  return s;
}

void write_slots(at::Tensor dst, const at::Tensor& slots, const std::vector<at::Tensor>& srcs,
                 const std::optional<at::Tensor>& label_src, const std::optional<at::Tensor>& channels) {
  TORCH_CHECK(dst.defined() && dst.dim() == 3, "dst must have rank 3 [slots, heads, width], got shape ",
              dst.defined() ? shape_of(dst) : "none");
  check_tensor(slots, "slots", 1, {at::kLong}, dst.device());
  TORCH_CHECK(!srcs.empty(), "write_slots needs at least one source");
  int64_t width = 0;
  for (const auto& src : srcs) {
    check_tensor(src, "src", 3, {dst.scalar_type()}, dst.device());
    TORCH_CHECK(src.size(0) >= slots.size(0) && src.size(1) == dst.size(1), "each src must be [T >= ",
                slots.size(0), ", ", dst.size(1), ", W], got shape ", shape_of(src));
    TORCH_CHECK(src.size(2) <= 1 || src.stride(2) == 1, "src must have unit stride along its last axis");
    width += src.size(2);
  }
  TORCH_CHECK(label_src.has_value() == channels.has_value(), "label_src and channels go together");
  at::Tensor labels_of, chans;
  if (channels) {
    labels_of = *label_src;
    chans = channels->contiguous();
    check_tensor(labels_of, "label_src", 3, {dst.scalar_type()}, dst.device());
    check_tensor(chans, "channels", 2, {at::kLong}, dst.device());
    TORCH_CHECK(labels_of.size(0) >= slots.size(0) && labels_of.size(1) == dst.size(1), "label_src must be [T >= ",
                slots.size(0), ", ", dst.size(1), ", D], got shape ", shape_of(labels_of));
    TORCH_CHECK(chans.size(0) == dst.size(1), "channels must be [", dst.size(1), ", r], got shape ", shape_of(chans));
    const int64_t* c = chans.data_ptr<int64_t>();
    for (int64_t i = 0; i < chans.numel(); ++i) {
      TORCH_CHECK(c[i] >= 0 && c[i] < labels_of.size(2), "channels must lie in [0, ", labels_of.size(2), "), got ",
                  c[i]);
    }
    width += chans.size(1);
  }
  TORCH_CHECK(width == dst.size(2), "the sources' widths sum to ", width, ", dst is ", dst.size(2), " wide");
  TORCH_CHECK(dst.size(2) <= 1 || dst.stride(2) == 1, "dst must have unit stride along its last axis");
  TORCH_CHECK(dst.is_cpu(), "write_slots runs on CPU tensors, got ", dst.device());
  const auto s = checked_slots(slots, dst);
  write_slots_cpu(dst, s, srcs, labels_of, chans);
}

void write_pruned_slots(at::Tensor dst, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v,
                        int64_t keep) {
  TORCH_CHECK(dst.defined() && dst.dim() == 3 && dst.is_cpu(), "dst must be a CPU tensor [slots, heads, width]");
  check_tensor(slots, "slots", 1, {at::kLong}, dst.device());
  check_tensor(k, "k", 3, {dst.scalar_type()}, dst.device());
  check_tensor(v, "v", 3, {dst.scalar_type()}, dst.device());
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", shape_of(k), " and ", shape_of(v));
  const int64_t dim = k.size(2), bitmap_bytes = (dim + 7) / 8, item = dst.element_size();
  TORCH_CHECK(dim >= 1 && dim <= 256, "k's head_dim must lie in [1, 256], got shape ", shape_of(k));
  TORCH_CHECK(keep >= 1 && keep < dim, "keep must lie in [1, head_dim - 1], got ", keep);
  TORCH_CHECK(k.size(0) >= slots.size(0) && k.size(1) == dst.size(1), "k must be [T >= ", slots.size(0), ", ",
              dst.size(1), ", D], got shape ", shape_of(k));
  TORCH_CHECK(dst.size(2) == 2 * keep + (2 * bitmap_bytes + item - 1) / item, "dst width ", dst.size(2),
              " is not the pruned slot of ", keep, " kept values of ", dim);
  TORCH_CHECK(dst.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "dst, k and v must have unit stride along their last axis");
  const auto s = checked_slots(slots, dst);
  write_pruned_slots_cpu(dst, s, k, v, keep);
}

std::tuple<at::Tensor, at::Tensor> topk_tokens(const at::Tensor& scores, const at::Tensor& lengths, int64_t k,
                                               int64_t sink, int64_t recent,
                                               const std::optional<at::Tensor>& budgets) {
  check_tensor(scores, "scores", 3, {at::kFloat}, scores.device());
  check_tensor(lengths, "lengths", 1, {at::kInt}, scores.device());
  check_size(lengths, "lengths", 0, scores.size(0), "the batch of scores");
  TORCH_CHECK(k > 0, "k must be positive, got ", k);
  TORCH_CHECK(sink >= 0 && recent >= 0, "sink and recent must be non-negative, got ", sink, " and ", recent);
  TORCH_CHECK(sink + recent <= k, "sink + recent (", sink + recent, ") must not exceed k (", k, ")");
  std::optional<at::Tensor> budget;
  if (budgets.has_value()) {
    check_tensor(*budgets, "budgets", 1, {at::kInt}, scores.device());
    check_size(*budgets, "budgets", 0, scores.size(0), "the batch of scores");
    budget = budgets->contiguous();
  }
  const auto s = scores.contiguous();
  const auto len = lengths.contiguous();
  if (s.is_cuda()) {
#ifdef SPARSE_ATTN_WITH_CUDA
    return topk_tokens_cuda(s, len, k, sink, recent, budget);
#else
    TORCH_CHECK(false, "scores is a CUDA tensor but sparse_attn._C was built without CUDA");
#endif
  }
  TORCH_CHECK(s.is_cpu(), "scores must be a CPU or CUDA tensor, got ", s.device());
  return topk_tokens_cpu(s, len, k, sink, recent, budget);
}

// Slot bounds need the lengths and offsets on the host, so they are checked for CPU tensors only.
void check_slot_bounds(const CompressedDecodeInputs& in) {
  const auto offsets = in.offsets.contiguous();
  const auto lengths = in.comp_lengths.contiguous();
  const int64_t batch = offsets.size(0), heads = offsets.size(1), tiles = num_tiles(in.q.size(2));
  const int64_t k_slots = std::min(in.k_bitmaps.numel() / tiles, in.k_values.numel() / in.k_keep);
  const int64_t v_slots = std::min(in.v_bitmaps.numel() / tiles, in.v_values.numel() / in.v_keep);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  const int32_t* rec = in.recent_lengths.contiguous().data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len[b] >= 0, "comp_lengths[", b, "] is negative: ", len[b]);
    TORCH_CHECK(rec[b] >= 0 && rec[b] <= in.k_recent.size(2), "recent_lengths[", b, "] = ", rec[b],
                " must lie in [0, ", in.k_recent.size(2), "] (the window of k_recent)");
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t first = off[b * heads + h], end = first + len[b];
      TORCH_CHECK(first >= 0, "offsets[", b, ", ", h, "] is negative: ", first);
      TORCH_CHECK(len[b] == 0 || (end <= k_slots && end <= v_slots), "offsets[", b, ", ", h, "] + comp_lengths[", b,
                  "] = ", end, " slots exceeds the compressed buffers (", k_slots, " K slots, ", v_slots, " V slots)");
    }
  }
}

std::tuple<at::Tensor, at::Tensor> compressed_decode_attention(
    const at::Tensor& q, const at::Tensor& k_bitmaps, const at::Tensor& k_values, int64_t k_keep,
    const at::Tensor& v_bitmaps, const at::Tensor& v_values, int64_t v_keep, const at::Tensor& offsets,
    const at::Tensor& comp_lengths, const at::Tensor& k_recent, const at::Tensor& v_recent,
    const at::Tensor& recent_lengths, double scale, int64_t max_context) {
  const auto dev = q.device();
  const std::initializer_list<at::ScalarType> floats = {at::kFloat, at::kHalf, at::kBFloat16};
  check_tensor(q, "q", 3, floats, dev);
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim > 0 && head_dim <= 256, "q head_dim must lie in [1, 256], got ", head_dim);
  check_tensor(k_bitmaps, "k_bitmaps", 1, {at::kLong}, dev);
  check_tensor(v_bitmaps, "v_bitmaps", 1, {at::kLong}, dev);
  check_tensor(k_values, "k_values", 1, {q.scalar_type()}, dev);
  check_tensor(v_values, "v_values", 1, {q.scalar_type()}, dev);
  TORCH_CHECK(k_keep >= 1 && k_keep <= head_dim, "k_keep must lie in [1, head_dim=", head_dim, "], got ", k_keep);
  TORCH_CHECK(v_keep >= 1 && v_keep <= head_dim, "v_keep must lie in [1, head_dim=", head_dim, "], got ", v_keep);
  check_tensor(offsets, "offsets", 2, {at::kLong}, dev);
  check_size(offsets, "offsets", 0, batch, "the batch of q");
  const int64_t kv_heads = offsets.size(1);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "q heads (", q_heads,
              ") must be a positive multiple of the KV heads of offsets (", kv_heads, ")");
  check_tensor(comp_lengths, "comp_lengths", 1, {at::kInt}, dev);
  check_size(comp_lengths, "comp_lengths", 0, batch, "the batch of q");
  check_tensor(k_recent, "k_recent", 4, {q.scalar_type()}, dev);
  TORCH_CHECK(k_recent.size(0) == batch && k_recent.size(1) == kv_heads && k_recent.size(3) == head_dim,
              "k_recent must be [B=", batch, ", Hkv=", kv_heads, ", W, D=", head_dim, "], got ", shape_of(k_recent));
  check_tensor(v_recent, "v_recent", 4, {q.scalar_type()}, dev);
  TORCH_CHECK(v_recent.sizes() == k_recent.sizes(), "v_recent must have the shape of k_recent ",
              shape_of(k_recent), ", got ", shape_of(v_recent));
  check_tensor(recent_lengths, "recent_lengths", 1, {at::kInt}, dev);
  check_size(recent_lengths, "recent_lengths", 0, batch, "the batch of q");
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
  TORCH_CHECK(max_context >= 0, "max_context must be non-negative, got ", max_context);

  CompressedDecodeInputs in;
  in.q = q.contiguous();
  in.k_bitmaps = k_bitmaps.contiguous();
  in.k_values = k_values.contiguous();
  in.v_bitmaps = v_bitmaps.contiguous();
  in.v_values = v_values.contiguous();
  in.k_keep = k_keep;
  in.v_keep = v_keep;
  in.offsets = offsets.contiguous();
  in.comp_lengths = comp_lengths.contiguous();
  in.k_recent = k_recent.contiguous();
  in.v_recent = v_recent.contiguous();
  in.recent_lengths = recent_lengths.contiguous();
  in.scale = scale;
  in.max_context = max_context;
  if (q.is_cuda()) {
#ifdef SPARSE_ATTN_WITH_CUDA
    TORCH_CHECK(q_heads / kv_heads <= 32, "the CUDA kernel supports up to 32 query heads per KV head, got ",
                q_heads / kv_heads);
    return compressed_decode_attention_cuda(in);
#else
    TORCH_CHECK(false, "q is a CUDA tensor but sparse_attn._C was built without CUDA");
#endif
  }
  TORCH_CHECK(q.is_cpu(), "q must be a CPU or CUDA tensor, got ", q.device());
  check_slot_bounds(in);
  return compressed_decode_attention_cpu(in);
}

// cu_seqlens: int32 [B + 1] from 0, non-decreasing, ending at the token count of its tensor.
at::Tensor checked_cu_seqlens(const at::Tensor& cu, const char* name, int64_t batch, int64_t tokens) {
  check_tensor(cu, name, 1, {at::kInt}, cu.device());
  TORCH_CHECK(cu.is_cpu(), name, " must be a CPU tensor, got ", cu.device());
  check_size(cu, name, 0, batch + 1, "batch + 1");
  auto c = cu.contiguous();
  const int32_t* v = c.data_ptr<int32_t>();
  TORCH_CHECK(v[0] == 0, name, " must start at 0, got ", v[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(v[b + 1] >= v[b], name, " must be non-decreasing, got ", v[b], " then ", v[b + 1]);
  }
  TORCH_CHECK(v[batch] == tokens, name, " ends at ", v[batch], " but the tensor holds ", tokens, " tokens");
  return c;
}

// Mask values, read on the host: counts within the row width, used block ids non-negative (ids past a sequence
// read nothing). A plain loop over the (broadcast) rows: no tensor ops, so decode steps pay microseconds.
void check_mask_values(const at::Tensor& num_blocks, const at::Tensor& indices) {
  const auto nb = num_blocks.contiguous();
  const auto idx = indices.contiguous();
  const int32_t* n = nb.data_ptr<int32_t>();
  const int32_t* ids = idx.data_ptr<int32_t>();
  const int64_t rows = nb.numel(), width = idx.size(3);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(n[r] >= 0 && n[r] <= width, "kv_num_blocks must lie in [0, ", width,
                "] (the width of kv_indices), got ", n[r]);
    for (int64_t j = 0; j < n[r]; ++j) {
      TORCH_CHECK(ids[r * width + j] >= 0, "kv_indices has a negative block id: ", ids[r * width + j]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& block_table, int64_t page_size, const std::optional<at::Tensor>& kv_num_blocks,
    const std::optional<at::Tensor>& kv_indices, int64_t q_block_size, int64_t kv_block_size, bool causal,
    double scale, double skip_threshold, int64_t slot_keep, const std::optional<at::Tensor>& new_k,
    const std::optional<at::Tensor>& new_v, bool use_blas) {
  TORCH_CHECK(q.defined() && q.is_cpu(), "q must be a CPU tensor");
  const auto dev = q.device();
  check_tensor(q, "q", 3, {at::kFloat, at::kHalf, at::kBFloat16}, dev);
  check_tensor(k, "k", 3, {q.scalar_type()}, dev);
  check_tensor(v, "v", 3, {q.scalar_type()}, dev);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", shape_of(k), " and ", shape_of(v));
  const int64_t q_heads = q.size(1), kv_heads = k.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim > 0, "q head_dim must be positive, got shape ", shape_of(q));
  TORCH_CHECK(slot_keep >= 0 && slot_keep <= head_dim, "slot_keep must lie in [0, head_dim=", head_dim, "], got ",
              slot_keep);
  if (slot_keep > 0) {  // pruned slots: K and V values and their bitmaps, in k's dtype
    const int64_t bitmap = 2 * ((head_dim + 7) / 8), item = k.element_size();
    check_size(k, "k", 2, 2 * slot_keep + (bitmap + item - 1) / item, "the pruned slot width");
  } else {
    check_size(k, "k", 2, head_dim, "the head_dim of q");
  }
  TORCH_CHECK(new_k.has_value() == new_v.has_value(), "give both new_k and new_v, or neither");
  if (new_k.has_value()) {
    check_tensor(*new_k, "new_k", 3, {q.scalar_type()}, dev);
    check_tensor(*new_v, "new_v", 3, {q.scalar_type()}, dev);
    for (const at::Tensor* t : {&*new_k, &*new_v}) {
      TORCH_CHECK(t->size(0) == q.size(0) && t->size(1) == kv_heads && t->size(2) == head_dim,
                  "new_k/new_v must be [Tq=", q.size(0), ", Hkv=", kv_heads, ", D=", head_dim, "], got ",
                  shape_of(*t));
      TORCH_CHECK(t->stride(2) == 1 || head_dim == 1, "new_k/new_v must have unit stride along head_dim");
    }
  }
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "q heads (", q_heads,
              ") must be a positive multiple of the KV heads of k (", kv_heads, ")");
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->stride(2) == 1 || t->size(2) == 1, name, " must have unit stride along head_dim, got strides ",
                c10::str(t->strides()));
  }
  const int64_t batch = cu_seqlens_q.dim() == 1 ? cu_seqlens_q.size(0) - 1 : -1;
  TORCH_CHECK(batch >= 1, "cu_seqlens_q must be a 1-D tensor [batch + 1] with batch >= 1, got shape ",
              shape_of(cu_seqlens_q));
  const auto cu_q = checked_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch, q.size(0));
  TORCH_CHECK(q_block_size >= 1 && kv_block_size >= 1, "q_block_size and kv_block_size must be positive, got ",
              q_block_size, " and ", kv_block_size);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be positive and finite, got ", scale);
  TORCH_CHECK(std::isfinite(skip_threshold) && skip_threshold >= 0, "skip_threshold must be finite and >= 0, got ",
              skip_threshold);

  BlockSparseAttentionInputs in;
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  if (block_table.has_value()) {  // paged keys
    TORCH_CHECK(!cu_seqlens_k.has_value(), "give cu_seqlens_k (varlen keys) or block_table (paged keys), not both");
    TORCH_CHECK(kv_lens.has_value(), "paged keys need kv_lens");
    TORCH_CHECK(page_size >= 1 && k.size(0) % page_size == 0, "page_size must be positive and divide the ",
                k.size(0), " rows of k, got ", page_size);
    check_tensor(*block_table, "block_table", 2, {at::kInt}, dev);
    check_size(*block_table, "block_table", 0, batch, "the batch");
    TORCH_CHECK(block_table->stride(1) == 1 || block_table->size(1) <= 1, "block_table must be contiguous along pages");
    in.block_table = *block_table;
    in.page_size = page_size;
  } else {
    TORCH_CHECK(cu_seqlens_k.has_value(), "varlen keys need cu_seqlens_k");
    in.cu_seqlens_k = checked_cu_seqlens(*cu_seqlens_k, "cu_seqlens_k", batch, k.size(0));
  }
  if (kv_lens.has_value()) {
    check_tensor(*kv_lens, "kv_lens", 1, {at::kInt}, dev);
    check_size(*kv_lens, "kv_lens", 0, batch, "the batch");
    in.kv_lens = kv_lens->contiguous();
  } else {
    in.kv_lens = (in.cu_seqlens_k.narrow(0, 1, batch) - in.cu_seqlens_k.narrow(0, 0, batch)).contiguous();
  }
  const int32_t* kl = in.kv_lens.data_ptr<int32_t>();
  const int32_t* ck = in.cu_seqlens_k.defined() ? in.cu_seqlens_k.data_ptr<int32_t>() : nullptr;
  int64_t max_q_len = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = cq[b + 1] - cq[b];
    max_q_len = std::max(max_q_len, q_len);
    TORCH_CHECK(kl[b] >= 0, "kv_lens[", b, "] is negative: ", kl[b]);
    TORCH_CHECK(!ck || kl[b] == ck[b + 1] - ck[b], "kv_lens[", b, "] = ", kl[b], " disagrees with cu_seqlens_k");
    TORCH_CHECK(!causal || q_len <= kl[b], "sequence ", b, ": q_len ", q_len, " > kv_len ", kl[b],
                "; with causal=True the queries are the last q_len positions of the context");
    if (in.block_table.defined()) {
      const int64_t pages = (kl[b] + page_size - 1) / page_size, num_pages = k.size(0) / page_size;
      // ValueError, like the Python entry point's checks: these page values are only checked here.
      TORCH_CHECK_VALUE(pages <= in.block_table.size(1), "kv_lens[", b, "] = ", kl[b], " needs ", pages,
                        " pages but block_table holds ", in.block_table.size(1));
      const int32_t* row = in.block_table.data_ptr<int32_t>() + b * in.block_table.stride(0);
      for (int64_t i = 0; i < pages; ++i) {
        TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < num_pages, "block_table entries of used pages must lie in [0, ",
                          num_pages, "): block_table[", b, ", ", i, "] = ", row[i]);
      }
    }
  }
  TORCH_CHECK(kv_num_blocks.has_value() == kv_indices.has_value(),
              "give both kv_num_blocks and kv_indices (a mask), or neither (dense)");
  if (kv_num_blocks.has_value()) {
    check_tensor(*kv_num_blocks, "kv_num_blocks", 3, {at::kInt}, dev);
    check_tensor(*kv_indices, "kv_indices", 4, {at::kInt}, dev);
    TORCH_CHECK(kv_num_blocks->size(0) == 1 || kv_num_blocks->size(0) == batch, "kv_num_blocks must have 1 or ",
                batch, " (the batch) along axis 0, got shape ", shape_of(*kv_num_blocks));
    const int64_t mh = kv_num_blocks->size(1);
    TORCH_CHECK(mh == 1 || mh == q_heads || mh == kv_heads, "kv_num_blocks must have 1, ", kv_heads,
                " (the KV heads) or ", q_heads, " (the query heads) along axis 1, got shape ", shape_of(*kv_num_blocks));
    for (int64_t axis = 0; axis < 3; ++axis) {
      check_size(*kv_indices, "kv_indices", axis, kv_num_blocks->size(axis), "the size of kv_num_blocks");
    }
    const int64_t needed = (max_q_len + q_block_size - 1) / q_block_size;
    TORCH_CHECK(kv_num_blocks->size(2) >= needed, "kv_num_blocks has ", kv_num_blocks->size(2), " query blocks of ",
                q_block_size, ", too few for q_len ", max_q_len);
    check_mask_values(*kv_num_blocks, *kv_indices);
    in.kv_num_blocks = *kv_num_blocks;
    in.kv_indices = *kv_indices;
  }
  in.q = q;
  in.k = k;
  in.v = v;
  in.cu_seqlens_q = cu_q;
  in.q_block_size = q_block_size;
  in.kv_block_size = kv_block_size;
  in.causal = causal;
  in.scale = scale;
  in.skip_threshold = skip_threshold;
  in.slot_keep = slot_keep;
  if (new_k.has_value()) {
    in.new_k = *new_k;
    in.new_v = *new_v;
  }
  in.use_blas = use_blas;
  return sparse_attn::block_sparse_attention_cpu(in);
}

std::tuple<at::Tensor, at::Tensor> decode_select(const at::Tensor& q, const at::Tensor& labels,
                                                 const at::Tensor& channels, const at::Tensor& block_table,
                                                 int64_t page_size, const at::Tensor& kv_lens, const at::Tensor& budgets,
                                                 int64_t width, int64_t sink, int64_t recent, int64_t slot_keep,
                                                 bool per_group, bool reduce_max,
                                                 const std::optional<at::Tensor>& label_scales, int64_t label_bits) {
  TORCH_CHECK(q.defined() && q.is_cpu(), "q must be a CPU tensor");
  const auto dev = q.device();
  check_tensor(q, "q", 3, {at::kFloat, at::kHalf, at::kBFloat16}, dev);
  const bool quantized = label_scales.has_value() && label_scales->defined();
  TORCH_CHECK(label_bits == 16 || label_bits == 8 || label_bits == 4,
              "label_bits must be 16 (unquantized labels), 8 or 4 (with label_scales), got ", label_bits);
  TORCH_CHECK(quantized == (label_bits != 16), "label_scales must be given exactly when label_bits is 8 or 4");
  if (label_bits == 8) {
    check_tensor(labels, "labels", 3, {at::kChar}, dev);
  } else if (label_bits == 4) {
    check_tensor(labels, "labels", 3, {at::kByte}, dev);
  } else {
    check_tensor(labels, "labels", 3, {at::kFloat, at::kHalf, at::kBFloat16}, dev);
  }
  if (quantized) {
    check_tensor(*label_scales, "label_scales", 2, {at::kHalf}, dev);
    TORCH_CHECK(label_scales->size(0) == labels.size(0) && label_scales->size(1) == labels.size(1),
                "label_scales must be [rows, Hkv] like labels ", shape_of(labels), ", got ", shape_of(*label_scales));
    TORCH_CHECK(slot_keep == 0, "quantized labels cannot be pruned slots (slot_keep must be 0)");
  }
  check_tensor(channels, "channels", 2, {at::kLong}, dev);
  check_tensor(block_table, "block_table", 2, {at::kInt}, dev);
  check_tensor(kv_lens, "kv_lens", 1, {at::kInt}, dev);
  check_tensor(budgets, "budgets", 1, {at::kInt}, dev);
  const int64_t batch = q.size(0), q_heads = q.size(1), dim = q.size(2), kv_heads = channels.size(0);
  const int64_t r = channels.size(1);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0 && labels.size(1) == kv_heads, "channels [Hkv, r] and labels "
              "[rows, Hkv, W] must agree on Hkv, a divisor of q's ", q_heads, " heads; got ", shape_of(channels),
              " and ", shape_of(labels));
  TORCH_CHECK(r >= 1 && r <= dim && dim <= 256, "channels must hold 1..head_dim (<= 256) channels, got ", r);
  TORCH_CHECK(q_heads / kv_heads <= 256, "at most 256 query heads per KV head, got ", q_heads / kv_heads);
  TORCH_CHECK(labels.stride(2) == 1 || labels.size(2) == 1, "labels must have unit stride along its last axis");
  if (slot_keep > 0) {
    TORCH_CHECK(r == dim, "exact scores over pruned slots take every channel (r = head_dim)");
    TORCH_CHECK(labels.size(2) >= 2 * slot_keep + 2 * ((dim + 7) / 8) / labels.element_size(),
                "labels rows are too narrow for pruned slots of ", slot_keep, " values");
  } else {
    const int64_t need = label_bits == 4 ? (r + 1) / 2 : r;
    TORCH_CHECK(labels.size(2) >= need, "labels rows hold ", labels.size(2), " values, fewer than the ", need,
                " that r = ", r, " labels of ", label_bits, " bits need");
  }
  const auto ch = channels.contiguous();
  const int64_t* c = ch.data_ptr<int64_t>();
  for (int64_t i = 0; i < ch.numel(); ++i) {
    TORCH_CHECK(c[i] >= 0 && c[i] < dim, "channels must lie in [0, ", dim, "), got ", c[i]);
  }
  check_size(block_table, "block_table", 0, batch, "the batch of q");
  check_size(kv_lens, "kv_lens", 0, batch, "the batch of q");
  check_size(budgets, "budgets", 0, batch, "the batch of q");
  TORCH_CHECK(page_size >= 1 && labels.size(0) % page_size == 0, "page_size must divide the label rows");
  TORCH_CHECK(width >= 1, "width must be positive");
  TORCH_CHECK(sink >= 0 && recent >= 0, "sink and recent must be non-negative, got ", sink, " and ", recent);
  TORCH_CHECK(block_table.stride(1) == 1 || block_table.size(1) <= 1, "block_table must be contiguous along pages");
  const int32_t* len = kv_lens.data_ptr<int32_t>();
  const int32_t* bud = budgets.contiguous().data_ptr<int32_t>();
  const int64_t num_pages = labels.size(0) / page_size;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t pages = (len[b] + page_size - 1) / page_size;
    TORCH_CHECK(len[b] >= 0 && pages <= block_table.size(1), "kv_lens[", b, "] = ", len[b], " must lie in [0, ",
                block_table.size(1) * page_size, "]");
    TORCH_CHECK(bud[b] >= 0 && bud[b] <= width, "budgets[", b, "] = ", bud[b], " must lie in [0, width=", width, "]");
    const int32_t* row = block_table.data_ptr<int32_t>() + b * block_table.stride(0);
    for (int64_t i = 0; i < pages; ++i) {
      TORCH_CHECK(row[i] >= 0 && row[i] < num_pages, "block_table[", b, ", ", i, "] = ", row[i], " must lie in [0, ",
                  num_pages, ")");
    }
  }
  DecodeSelectInputs in;
  in.q = q;
  in.labels = labels;
  in.channels = ch;
  in.block_table = block_table;
  in.kv_lens = kv_lens.contiguous();
  in.budgets = budgets.contiguous();
  in.page_size = page_size;
  in.width = width;
  in.sink = sink;
  in.recent = recent;
  in.slot_keep = slot_keep;
  in.per_group = per_group;
  in.reduce_max = reduce_max;
  if (quantized) in.label_scales = *label_scales;
  return decode_select_cpu(in);
}

at::Tensor pooled_block_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                               int64_t kv_block_size, double scale, bool causal, bool mean,
                               const std::string& products) {
  TORCH_CHECK(q.defined() && q.is_cpu(), "q must be a CPU tensor");
  const auto dev = q.device();
  check_tensor(q, "q", 4, {at::kFloat, at::kHalf, at::kBFloat16}, dev);
  check_tensor(k, "k", 3, {q.scalar_type()}, dev);
  check_tensor(pos, "pos", 2, {at::kInt}, dev);
  const int64_t proxies = q.size(0), kv_heads = k.size(1);
  TORCH_CHECK(q.size(3) > 0 && k.size(2) == q.size(3), "k head_dim must equal q head_dim (> 0), got shapes ",
              shape_of(q), " and ", shape_of(k));
  TORCH_CHECK(kv_heads > 0 && proxies % kv_heads == 0, "the proxy heads of q (", proxies,
              ") must be a positive multiple of the KV heads of k (", kv_heads, ")");
  TORCH_CHECK(pos.size(0) == q.size(1) && pos.size(1) == q.size(2), "pos must be [nq, R] = [", q.size(1), ", ",
              q.size(2), "], got ", shape_of(pos));
  TORCH_CHECK(k.stride(2) == 1 || k.size(2) == 1, "k must have unit stride along head_dim");
  TORCH_CHECK(kv_block_size >= 1, "kv_block_size must be positive, got ", kv_block_size);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be positive and finite, got ", scale);
  PooledBlockScoresInputs in;
  in.q = q.contiguous();
  in.k = k;
  in.pos = pos.contiguous();
  const int32_t* p = in.pos.data_ptr<int32_t>();
  for (int64_t i = 0; i < in.pos.numel(); ++i) {
    TORCH_CHECK(p[i] >= -1 && (!causal || p[i] < k.size(0)), "pos must lie in [-1, ", k.size(0), "), got ", p[i]);
  }
  in.kv_block_size = kv_block_size;
  in.scale = scale;
  in.causal = causal;
  in.mean = mean;
  in.products = products;
  return pooled_block_scores_cpu(in);
}

SelectBlocksInputs checked_select_inputs(const at::Tensor& scores, const at::Tensor& budgets,
                                         const at::Tensor& proxy_of_head, const at::Tensor& bounds,
                                         const at::Tensor& diag, int64_t tail_from) {
  TORCH_CHECK(scores.defined() && scores.is_cpu(), "scores must be a CPU tensor");
  const auto dev = scores.device();
  check_tensor(scores, "scores", 3, {at::kFloat}, dev);
  check_tensor(budgets, "budgets", 1, {at::kLong}, dev);
  check_tensor(proxy_of_head, "proxy_of_head", 1, {at::kLong}, dev);
  check_tensor(bounds, "bounds", 1, {at::kLong}, dev);
  check_tensor(diag, "diag", 1, {at::kLong}, dev);
  const int64_t proxies = scores.size(0), nq = scores.size(1), nk = scores.size(2), heads = budgets.size(0);
  check_size(proxy_of_head, "proxy_of_head", 0, heads, "the heads of budgets");
  check_size(bounds, "bounds", 0, nq, "the query blocks of scores");
  check_size(diag, "diag", 0, nq, "the query blocks of scores");
  SelectBlocksInputs in;
  in.scores = scores.contiguous();
  in.budgets = budgets.contiguous();
  in.proxy_of_head = proxy_of_head.contiguous();
  in.bounds = bounds.contiguous();
  in.diag = diag.contiguous();
  in.tail_from = tail_from;
  const int64_t* b = in.budgets.data_ptr<int64_t>();
  const int64_t* p = in.proxy_of_head.data_ptr<int64_t>();
  for (int64_t h = 0; h < heads; ++h) {
    TORCH_CHECK(b[h] >= 1, "budgets[", h, "] = ", b[h], " must be at least 1");
    TORCH_CHECK(p[h] >= 0 && p[h] < proxies, "proxy_of_head[", h, "] = ", p[h], " must lie in [0, ", proxies, ")");
  }
  const int64_t* bd = in.bounds.data_ptr<int64_t>();
  const int64_t* dg = in.diag.data_ptr<int64_t>();
  for (int64_t i = 0; i < nq; ++i) {
    TORCH_CHECK(bd[i] >= 0 && bd[i] <= nk, "bounds[", i, "] = ", bd[i], " must lie in [0, ", nk, "]");
    TORCH_CHECK(dg[i] >= -1 && dg[i] < std::max<int64_t>(nk, 1), "diag[", i, "] = ", dg[i], " must lie in [-1, ", nk,
                ")");
  }
  return in;
}

at::Tensor select_blocks(const at::Tensor& scores, const at::Tensor& budgets, const at::Tensor& proxy_of_head,
                         const at::Tensor& bounds, const at::Tensor& diag, int64_t tail_from) {
  const auto in = checked_select_inputs(scores, budgets, proxy_of_head, bounds, diag, tail_from);
  const int64_t heads = budgets.size(0), nq = scores.size(1), nk = scores.size(2);
  auto keep = at::zeros({heads, nq, nk}, scores.options().dtype(at::kBool));
  if (heads > 0 && nq > 0 && nk > 0) select_blocks_cpu(in, keep);
  return keep;
}

std::tuple<at::Tensor, at::Tensor> select_block_rows(const at::Tensor& scores, const at::Tensor& budgets,
                                                     const at::Tensor& proxy_of_head, const at::Tensor& bounds,
                                                     const at::Tensor& diag, int64_t tail_from) {
  return select_block_rows_cpu(checked_select_inputs(scores, budgets, proxy_of_head, bounds, diag, tail_from));
}

std::tuple<at::Tensor, at::Tensor> block_rows(const at::Tensor& keep) {
  TORCH_CHECK(keep.defined() && keep.is_cpu(), "keep must be a CPU tensor");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() >= 1, "keep must be a bool tensor with a block axis, got ",
              keep.scalar_type(), " ", shape_of(keep));
  return block_rows_cpu(keep.contiguous());
}

}  // namespace
}  // namespace sparse_attn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse-attn C++/CUDA operators (CPU always; CUDA when built with CUDA torch and nvcc)";
#ifdef SPARSE_ATTN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("write_slots", &sparse_attn::write_slots,
        "write_slots(dst [S, H, W], slots int64 [n], srcs [T >= n, H, W_j] with sum(W_j) == W): dst[slots[i]] = the "
        "sources' rows i side by side, where slots[i] >= 0; with label_src [T >= n, H, D] and channels int64 [H, r], "
        "the last r columns of head h take label_src[i, h, channels[h]] (a key's Double Sparsity label)",
        py::arg("dst"), py::arg("slots"), py::arg("srcs"), py::arg("label_src") = py::none(),
        py::arg("channels") = py::none());
  m.def("write_pruned_slots", &sparse_attn::write_pruned_slots,
        "write_pruned_slots(dst [S, H, W], slots int64 [n], k/v [T >= n, H, D], keep): K and V pruned to their keep "
        "largest magnitudes and packed into slot slots[i] (negative: skipped)",
        py::arg("dst"), py::arg("slots"), py::arg("k"), py::arg("v"), py::arg("keep"));
  m.def("topk_tokens", &sparse_attn::topk_tokens,
        "Per (b, h) row: the k (or budgets[b] <= k) highest scores among the first lengths[b] tokens, with the sink "
        "tokens [0, sink) and the recent tokens [len - recent, len) always kept (sink + recent <= k). Returns "
        "(indices int32 [B, H, k] ascending, zero-padded past the count; counts int32 [B, H]). Ties go to the lower "
        "index.",
        py::arg("scores"), py::arg("lengths"), py::arg("k"), py::arg("sink") = 0, py::arg("recent") = 0,
        py::arg("budgets") = py::none());
  m.def("compressed_decode_attention", &sparse_attn::compressed_decode_attention,
        "One decode query per (b, head) against a bitmap-compressed KV cache plus a dense recent window, computed "
        "on the compressed tiles. Returns (out [B, Hq, D] in q's dtype, lse fp32 [B, Hq], -inf for empty contexts).",
        py::arg("q"), py::arg("k_bitmaps"), py::arg("k_values"), py::arg("k_keep"), py::arg("v_bitmaps"),
        py::arg("v_values"), py::arg("v_keep"), py::arg("offsets"), py::arg("comp_lengths"), py::arg("k_recent"),
        py::arg("v_recent"), py::arg("recent_lengths"), py::arg("scale"), py::arg("max_context") = 0);
  m.def("decode_select", &sparse_attn::decode_select,
        "Decode token selection on CPU tensors, read from pages in place: per (b, KV head) (per_group) or per (b, "
        "query head), score tokens [0, kv_lens[b]) with q[channels] . label (labels [rows, Hkv, W]: a token's label "
        "in its first r columns, or its key; slot_keep > 0: pruned K slots, exact), reduced over the group by max "
        "(reduce_max) or sum, and keep budgets[b] of them: the sink and recent tokens and the best others. Quantized "
        "labels (label_bits 8: int8 codes; 4: uint8, two codes per byte) are code * label_scales [rows, Hkv] fp16. Returns "
        "(indices int32 [B, H, width] ascending, zero-padded; counts int32 [B, H]).",
        py::arg("q"), py::arg("labels"), py::arg("channels"), py::arg("block_table"), py::arg("page_size"),
        py::arg("kv_lens"), py::arg("budgets"), py::arg("width"), py::arg("sink"), py::arg("recent"),
        py::arg("slot_keep") = 0, py::arg("per_group") = true, py::arg("reduce_max") = true,
        py::arg("label_scales") = py::none(), py::arg("label_bits") = 16);
  m.def("estimate_products", &sparse_attn::estimate_products_cpu,
        "The products pooled_block_scores uses on this CPU for head dim `dim` under products='auto': 'bf16', "
        "'int16' or 'fp32'.",
        py::arg("dim"));
  m.def("pooled_block_scores", &sparse_attn::pooled_block_scores,
        "Softmax probabilities of sampled query rows q [P, nq, R, D] (positions pos int32 [nq, R], -1 empty) over "
        "the keys k [Tk, Hk, D] they see, pooled per (proxy head, query block, KV block) without materializing the "
        "scores: the max probability in the block (mean=False) or the block's mass averaged over the rows "
        "(mean=True). Returns fp32 [P, nq, ceil(Tk / kv_block_size)]. products: 'auto' (the fastest this CPU "
        "has, see estimate_products), 'fp32' (exact), 'bf16' (bf16-rounded q and k, fp32 sums; AVX512-BF16) or "
        "'int16' (rows quantized to int16 with per-row scales, int32 sums; AVX512-VNNI); the last two need head "
        "dims that are multiples of 32.",
        py::arg("q"), py::arg("k"), py::arg("pos"), py::arg("kv_block_size"), py::arg("scale"), py::arg("causal"),
        py::arg("mean"), py::arg("products") = "auto");
  m.def("block_rows", &sparse_attn::block_rows,
        "Compress a bool block matrix keep [..., nk] into rows: (counts int32 [...], indices int32 [..., W]) with each "
        "row's kept block ids ascending, zero past its count; W = the largest count, at least 1.",
        py::arg("keep"));
  m.def("select_blocks", &sparse_attn::select_blocks,
        "Head-proxy block selection from pooled scores [P, nq, nk] fp32: per query head h (budgets int64 [Hq] "
        "blocks, proxy_of_head int64 [Hq]) and query block i, block 0 and diag[i] (-1: none) first, then the visible "
        "blocks j < bounds[i] with the best scores of the head's proxy (ties: the lower block), budgets[h] in all; "
        "query blocks i >= tail_from keep every block. Returns bool [Hq, nq, nk].",
        py::arg("scores"), py::arg("budgets"), py::arg("proxy_of_head"), py::arg("bounds"), py::arg("diag"),
        py::arg("tail_from"));
  m.def("select_block_rows", &sparse_attn::select_block_rows,
        "select_blocks' selection as block rows, clipped to the visible blocks j < bounds[i]: (counts int32 [Hq, nq], "
        "indices int32 [Hq, nq, W] ascending, zero past each count; W the largest count, at least 1).",
        py::arg("scores"), py::arg("budgets"), py::arg("proxy_of_head"), py::arg("bounds"), py::arg("diag"),
        py::arg("tail_from"));
  m.def("block_sparse_attention_cpu", &sparse_attn::block_sparse_attention,
        "Block-sparse attention on CPU tensors: q [Tq, Hq, D] with cu_seqlens_q int32 [B + 1]; keys k/v "
        "[rows, Hkv, D] either varlen (cu_seqlens_k int32 [B + 1]) or paged (block_table int32 [B, max_pages], "
        "page_size, kv_lens int32 [B]: key t of sequence b at row block_table[b, t // page_size] * page_size + "
        "t % page_size); mask rows kv_num_blocks int32 [B or 1, Hq or 1, nq] and kv_indices int32 [.., nq, W], or "
        "neither for dense (axis 1 of the mask: 1, Hkv or Hq). slot_keep > 0: k holds KV-pruned slots [rows, Hkv, "
        "2 * slot_keep + bitmaps] (v unused). new_k/new_v [Tq, Hkv, D]: the step's own tokens, read for the last q_len "
        "positions instead of the cache. Queries are the last q_len positions of each context. skip_threshold > 0 skips key tiles "
        "whose scores all lie that far (natural log) below their rows' running maxima. Returns (out [Tq, Hq, D] in "
        "q's dtype, lse fp32 [Hq, Tq]; 0 and -inf for rows that read no key; stats int64 [tiles, skipped tiles]). "
        "use_blas=False runs the products as portable vectorized loops instead of the AVX-512 register tiles and "
        "torch's BLAS sgemm.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k") = py::none(),
        py::arg("kv_lens") = py::none(), py::arg("block_table") = py::none(), py::arg("page_size") = 0,
        py::arg("kv_num_blocks") = py::none(), py::arg("kv_indices") = py::none(), py::arg("q_block_size") = 1,
        py::arg("kv_block_size") = 1, py::arg("causal") = true, py::arg("scale") = 1.0,
        py::arg("skip_threshold") = 0.0, py::arg("slot_keep") = 0, py::arg("new_k") = py::none(),
        py::arg("new_v") = py::none(), py::arg("use_blas") = true);
}
