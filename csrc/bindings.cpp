// sparse_attn._C: argument checks and device dispatch for every operator (CPU in csrc/cpu, CUDA in csrc/cuda).
// The Python wrappers in sparse_attn/ops/extension.py raise ValueError before reaching here; these checks guard
// direct calls, and every message names the argument.
#include <torch/extension.h>

#include <string>

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
}
