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

std::tuple<at::Tensor, at::Tensor> block_sparse_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
    int64_t q_block_size, int64_t kv_block_size, bool causal, double scale, bool use_blas) {
  TORCH_CHECK(q.defined() && q.is_cpu(), "q must be a CPU tensor");
  const auto dev = q.device();
  check_tensor(q, "q", 3, {at::kFloat, at::kHalf, at::kBFloat16}, dev);
  check_tensor(k, "k", 3, {q.scalar_type()}, dev);
  check_tensor(v, "v", 3, {q.scalar_type()}, dev);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", shape_of(k), " and ", shape_of(v));
  const int64_t q_heads = q.size(1), kv_heads = k.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim > 0, "q head_dim must be positive, got shape ", shape_of(q));
  check_size(k, "k", 2, head_dim, "the head_dim of q");
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
  const auto cu_k = checked_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch, k.size(0));
  TORCH_CHECK(q_block_size >= 1 && kv_block_size >= 1, "q_block_size and kv_block_size must be positive, got ",
              q_block_size, " and ", kv_block_size);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be positive and finite, got ", scale);

  check_tensor(kv_num_blocks, "kv_num_blocks", 3, {at::kInt}, dev);
  check_tensor(kv_indices, "kv_indices", 4, {at::kInt}, dev);
  TORCH_CHECK(kv_num_blocks.size(0) == 1 || kv_num_blocks.size(0) == batch, "kv_num_blocks must have 1 or ", batch,
              " (the batch) along axis 0, got shape ", shape_of(kv_num_blocks));
  TORCH_CHECK(kv_num_blocks.size(1) == 1 || kv_num_blocks.size(1) == q_heads, "kv_num_blocks must have 1 or ",
              q_heads, " (the query heads) along axis 1, got shape ", shape_of(kv_num_blocks));
  for (int64_t axis = 0; axis < 3; ++axis) {
    check_size(kv_indices, "kv_indices", axis, kv_num_blocks.size(axis), "the size of kv_num_blocks");
  }
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  int64_t max_q_len = 0;
  for (int64_t b = 0; b < batch; ++b) max_q_len = std::max<int64_t>(max_q_len, cq[b + 1] - cq[b]);
  const int64_t needed = (max_q_len + q_block_size - 1) / q_block_size;
  TORCH_CHECK(kv_num_blocks.size(2) >= needed, "kv_num_blocks has ", kv_num_blocks.size(2), " query blocks of ",
              q_block_size, ", too few for q_len ", max_q_len);
  // Values: counts within the row width, used block ids non-negative (ids past a sequence are masked).
  const int64_t width = kv_indices.size(3);
  if (kv_num_blocks.numel() > 0) {
    TORCH_CHECK(kv_num_blocks.min().item<int32_t>() >= 0 && kv_num_blocks.max().item<int32_t>() <= width,
                "kv_num_blocks must lie in [0, ", width, "] (the width of kv_indices)");
    const auto used = at::arange(width, kv_indices.options()) < kv_num_blocks.unsqueeze(-1);
    TORCH_CHECK(!(used & (kv_indices < 0)).any().item<bool>(), "kv_indices has negative block ids");
  }

  BlockSparseAttentionInputs in;
  in.q = q;
  in.k = k;
  in.v = v;
  in.cu_seqlens_q = cu_q;
  in.cu_seqlens_k = cu_k;
  in.kv_num_blocks = kv_num_blocks;
  in.kv_indices = kv_indices;
  in.q_block_size = q_block_size;
  in.kv_block_size = kv_block_size;
  in.causal = causal;
  in.scale = scale;
  in.use_blas = use_blas;
  return sparse_attn::block_sparse_attention_cpu(in);
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
  m.def("block_sparse_attention_cpu", &sparse_attn::block_sparse_attention,
        "Block-sparse attention on CPU tensors, varlen: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_q/k int32 "
        "[B + 1], mask rows kv_num_blocks int32 [B or 1, Hq or 1, nq] and kv_indices int32 [.., nq, W]; queries are "
        "the last q_len positions of each context. Returns (out [Tq, Hq, D] in q's dtype, lse fp32 [Hq, Tq]; 0 and "
        "-inf for rows that read no key). use_blas=False runs the products as vectorized loops instead of torch's BLAS "
        "sgemm (the path taken where torch carries none).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("kv_num_blocks"), py::arg("kv_indices"), py::arg("q_block_size"), py::arg("kv_block_size"),
        py::arg("causal"), py::arg("scale"), py::arg("use_blas") = true);
}
