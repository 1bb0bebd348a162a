// sparse_attn._cuda_emu: the CUDA kernels of csrc/cuda run on the CPU by the emulation harness, on CPU tensors.
// The entry points fill the kernels' parameters as csrc/cuda/ops_cuda.cpp does for CUDA tensors and call the same
// launchers (kernels.h); a failed launch raises RuntimeError with the emulator's message.
#include <torch/extension.h>

#include <limits>
#include <string>

#include "../cuda/kernels.h"
#include "emulation_control.h"
#include "selftest.h"

namespace sparse_attn::emu {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err), ": ", last_error_message());
}

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

int checked_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), name, " = ", v, " is out of the kernels' range");
  return static_cast<int>(v);
}

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "q has unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_tokens(const at::Tensor& scores, const at::Tensor& lengths, int64_t k,
                                               int64_t sink, int64_t recent,
                                               const std::optional<at::Tensor>& budgets) {
  check_cpu(scores, "scores", at::kFloat);
  check_cpu(lengths, "lengths", at::kInt);
  TORCH_CHECK(scores.dim() == 3 && lengths.numel() == scores.size(0), "scores [B, H, L] and lengths [B] expected");
  if (budgets) check_cpu(*budgets, "budgets", at::kInt);
  const int64_t batch = scores.size(0), heads = scores.size(1);
  // Unwritten slots show as -1. The max_len slots of slack after the last row keep the writes of a kernel broken on
  // purpose (a dropped barrier: rows may overflow into the next) inside the buffer.
  auto buffer = at::full({batch * heads * k + scores.size(2)}, -1, scores.options().dtype(at::kInt));
  auto indices = buffer.narrow(0, 0, batch * heads * k).view({batch, heads, k});
  auto counts = at::full({batch, heads}, -1, scores.options().dtype(at::kInt));
  cuda::TopkTokensParams p{};
  p.scores = scores.data_ptr<float>();
  p.lengths = lengths.data_ptr<int32_t>();
  p.budgets = budgets ? budgets->data_ptr<int32_t>() : nullptr;
  p.indices = indices.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.batch = checked_int(batch, "batch");
  p.heads = checked_int(heads, "heads");
  p.max_len = checked_int(scores.size(2), "scores length");
  p.k = checked_int(k, "k");
  p.sink = checked_int(sink, "sink");
  p.recent = checked_int(recent, "recent");
  check_launch(cuda::launch_topk_tokens(p, nullptr), "topk_tokens");
  return {indices, counts};
}

// As sparse_attn._C.compressed_decode_attention, plus the SM count that sizes the split grid (the GPU's own in
// ops_cuda.cpp); also returns the number of splits the plan chose.
std::tuple<at::Tensor, at::Tensor, int64_t> compressed_decode_attention(
    const at::Tensor& q, const at::Tensor& k_bitmaps, const at::Tensor& k_values, int64_t k_keep,
    const at::Tensor& v_bitmaps, const at::Tensor& v_values, int64_t v_keep, const at::Tensor& offsets,
    const at::Tensor& comp_lengths, const at::Tensor& k_recent, const at::Tensor& v_recent,
    const at::Tensor& recent_lengths, double scale, int64_t max_context, int64_t device_sms) {
  const auto dtype = q.scalar_type();
  check_cpu(q, "q", dtype);
  kernel_dtype(dtype);
  check_cpu(k_bitmaps, "k_bitmaps", at::kLong);
  check_cpu(v_bitmaps, "v_bitmaps", at::kLong);
  check_cpu(k_values, "k_values", dtype);
  check_cpu(v_values, "v_values", dtype);
  check_cpu(offsets, "offsets", at::kLong);
  check_cpu(comp_lengths, "comp_lengths", at::kInt);
  check_cpu(k_recent, "k_recent", dtype);
  check_cpu(v_recent, "v_recent", dtype);
  check_cpu(recent_lengths, "recent_lengths", at::kInt);
  TORCH_CHECK(q.dim() == 3 && offsets.dim() == 2 && k_recent.dim() == 4, "q [B, Hq, D], offsets [B, Hkv] and "
              "k_recent [B, Hkv, W, D] expected");
  const int64_t batch = q.size(0), q_heads = q.size(1), dim = q.size(2);
  auto out = at::full(q.sizes(), std::numeric_limits<float>::quiet_NaN(), q.options());
  auto lse = at::full({batch, q_heads}, std::numeric_limits<float>::quiet_NaN(), q.options().dtype(at::kFloat));
  if (batch * q_heads == 0) return {out, lse, 0};

  cuda::CompressedDecodeParams p{};
  p.q = q.data_ptr();
  p.k_bitmaps = reinterpret_cast<const uint64_t*>(k_bitmaps.data_ptr<int64_t>());
  p.k_values = k_values.data_ptr();
  p.v_bitmaps = reinterpret_cast<const uint64_t*>(v_bitmaps.data_ptr<int64_t>());
  p.v_values = v_values.data_ptr();
  p.k_keep = checked_int(k_keep, "k_keep");
  p.v_keep = checked_int(v_keep, "v_keep");
  p.offsets = offsets.data_ptr<int64_t>();
  p.comp_lengths = comp_lengths.data_ptr<int32_t>();
  p.k_recent = k_recent.data_ptr();
  p.v_recent = v_recent.data_ptr();
  p.recent_lengths = recent_lengths.data_ptr<int32_t>();
  p.batch = checked_int(batch, "batch");
  p.q_heads = checked_int(q_heads, "q heads");
  p.kv_heads = checked_int(offsets.size(1), "KV heads");
  p.head_dim = checked_int(dim, "head_dim");
  p.window = checked_int(k_recent.size(2), "recent window");
  p.scale = static_cast<float>(scale);
  if (max_context == 0) max_context = comp_lengths.add(recent_lengths).max().item<int64_t>();
  cuda::plan_compressed_decode(p, checked_int(max_context, "max_context"), checked_int(device_sms, "device_sms"));
  // Workspaces start as NaN, so a partial result the combine step reads before it is written shows.
  auto partial_out = at::full({batch, q_heads, p.num_splits, dim}, std::numeric_limits<float>::quiet_NaN(),
                              q.options().dtype(at::kFloat));
  auto partial_lse = at::full({batch, q_heads, p.num_splits}, std::numeric_limits<float>::quiet_NaN(),
                              q.options().dtype(at::kFloat));
  p.partial_out = partial_out.data_ptr<float>();
  p.partial_lse = partial_lse.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_launch(cuda::launch_compressed_decode(kernel_dtype(dtype), p, nullptr), "compressed_decode_attention");
  return {out, lse, p.num_splits};
}

// ---------------------------------------------------------------------------------------------- self-tests
at::Tensor selftest_warp_ops(const at::Tensor& in) {
  check_cpu(in, "in", at::kInt);
  auto out = at::full({in.numel(), selftest::kWarpOpColumns}, -1, in.options());
  check_launch(selftest::warp_ops(in.data_ptr<int>(), out.data_ptr<int>(), checked_int(in.numel(), "threads")),
               "warp_ops");
  return out;
}

// Runs a self-test kernel that must fail; returns the launch's error message ("" if it succeeded).
std::string selftest_failure(const std::string& name) {
  auto out = at::zeros({32}, at::kInt);
  cudaError_t err;
  if (name == "divergent_shuffle") {
    err = selftest::divergent_shuffle(out.data_ptr<int>());
  } else if (name == "deadlock") {
    err = selftest::deadlock(out.data_ptr<int>());
  } else {
    TORCH_CHECK(false, "unknown self-test ", name);
  }
  return err == cudaSuccess ? std::string() : last_error_message();
}

// Returns (sum read back, error message or "").
std::tuple<int64_t, std::string> selftest_dynamic_shared(int64_t words, int64_t opt_in_bytes) {
  int out = 0;
  const cudaError_t err = selftest::dynamic_shared(checked_int(words, "words"), static_cast<int>(opt_in_bytes), &out);
  return {out, err == cudaSuccess ? std::string() : last_error_message()};
}

at::Tensor selftest_round(const at::Tensor& x, const std::string& dtype) {
  check_cpu(x, "x", at::kFloat);
  TORCH_CHECK(dtype == "half" || dtype == "bfloat16", "dtype must be half or bfloat16");
  auto bits = at::empty(x.sizes(), x.options().dtype(at::kShort));
  auto back = at::empty(x.sizes(), x.options());
  const float* in = x.data_ptr<float>();
  int16_t* b = bits.data_ptr<int16_t>();
  float* f = back.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const uint16_t u = dtype == "half" ? selftest::float_to_half_bits(in[i]) : selftest::float_to_bfloat16_bits(in[i]);
    b[i] = static_cast<int16_t>(u);
    f[i] = dtype == "half" ? selftest::half_bits_to_float(u) : selftest::bfloat16_bits_to_float(u);
  }
  return at::stack({bits.to(at::kFloat), back});  // exact: 16-bit patterns fit a float
}

}  // namespace
}  // namespace sparse_attn::emu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace e = sparse_attn::emu;
  m.doc() = "The CUDA kernels of csrc/cuda run on the CPU by the emulation harness of csrc/emulation (tests only).";
  m.def("topk_tokens", &e::topk_tokens, "The GPU top-k kernel, emulated; as sparse_attn._C.topk_tokens",
        py::arg("scores"), py::arg("lengths"), py::arg("k"), py::arg("sink") = 0, py::arg("recent") = 0,
        py::arg("budgets") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("compressed_decode_attention", &e::compressed_decode_attention,
        "The GPU compressed-cache decode kernels, emulated; returns (out, lse, num_splits)", py::arg("q"),
        py::arg("k_bitmaps"), py::arg("k_values"), py::arg("k_keep"), py::arg("v_bitmaps"), py::arg("v_values"),
        py::arg("v_keep"), py::arg("offsets"), py::arg("comp_lengths"), py::arg("k_recent"), py::arg("v_recent"),
        py::arg("recent_lengths"), py::arg("scale"), py::arg("max_context"), py::arg("device_sms"),
        py::call_guard<py::gil_scoped_release>());
  m.def("drop_barrier", &e::drop_barrier,
        "Make the __syncthreads at (file suffix, line) a no-op (line -1: none); resets dropped_barrier_calls");
  m.def("dropped_barrier_calls", &e::dropped_barrier_calls);
  m.def("set_stall_timeout", &e::set_stall_timeout, "Seconds without a completed barrier before a launch fails");
  m.def("barrier_site_counts", &e::barrier_site_counts, "[(file:line, completed __syncthreads)] since the reset");
  m.def("reset_barrier_site_counts", &e::reset_barrier_site_counts);
  m.def("selftest_warp_ops", &e::selftest_warp_ops, py::call_guard<py::gil_scoped_release>());
  m.def("selftest_failure", &e::selftest_failure, py::call_guard<py::gil_scoped_release>());
  m.def("selftest_dynamic_shared", &e::selftest_dynamic_shared, py::call_guard<py::gil_scoped_release>());
  m.def("selftest_round", &e::selftest_round);
}
