// Torch glue of the CUDA operators: device guard, output and workspace allocation, the current stream, then the
// launchers of kernels.h. Compiled only in CUDA builds (setup.py defines SPARSE_ATTN_WITH_CUDA).
#ifdef SPARSE_ATTN_WITH_CUDA

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../ops.h"
#include "kernels.h"

namespace sparse_attn {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "q has unsupported dtype ", t);
  }
}

int checked_int(int64_t v, const char* name) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), name, " = ", v, " is too large for the CUDA kernels");
  return static_cast<int>(v);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_tokens_cuda(const at::Tensor& scores, const at::Tensor& lengths, int64_t k,
                                                    int64_t sink, int64_t recent,
                                                    const std::optional<at::Tensor>& budgets) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t batch = scores.size(0), heads = scores.size(1);
  auto indices = at::empty({batch, heads, k}, scores.options().dtype(at::kInt));
  auto counts = at::empty({batch, heads}, scores.options().dtype(at::kInt));
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
  C10_CUDA_CHECK(cuda::launch_topk_tokens(p, c10::cuda::getCurrentCUDAStream()));
  return {indices, counts};
}

std::tuple<at::Tensor, at::Tensor> compressed_decode_attention_cuda(const CompressedDecodeInputs& in) {
  const c10::cuda::CUDAGuard guard(in.q.device());
  const int64_t batch = in.q.size(0), q_heads = in.q.size(1), dim = in.q.size(2);
  auto out = at::empty(in.q.sizes(), in.q.options());
  auto lse = at::empty({batch, q_heads}, in.q.options().dtype(at::kFloat));
  if (batch * q_heads == 0) return {out, lse};

  cuda::CompressedDecodeParams p{};
  p.q = in.q.data_ptr();
  p.k_bitmaps = reinterpret_cast<const uint64_t*>(in.k_bitmaps.data_ptr<int64_t>());
  p.k_values = in.k_values.data_ptr();
  p.v_bitmaps = reinterpret_cast<const uint64_t*>(in.v_bitmaps.data_ptr<int64_t>());
  p.v_values = in.v_values.data_ptr();
  p.k_keep = checked_int(in.k_keep, "k_keep");
  p.v_keep = checked_int(in.v_keep, "v_keep");
  p.offsets = in.offsets.data_ptr<int64_t>();
  p.comp_lengths = in.comp_lengths.data_ptr<int32_t>();
  p.k_recent = in.k_recent.data_ptr();
  p.v_recent = in.v_recent.data_ptr();
  p.recent_lengths = in.recent_lengths.data_ptr<int32_t>();
  p.batch = checked_int(batch, "batch");
  p.q_heads = checked_int(q_heads, "q heads");
  p.kv_heads = checked_int(in.offsets.size(1), "KV heads");
  p.head_dim = checked_int(dim, "head_dim");
  p.window = checked_int(in.k_recent.size(2), "recent window");
  p.scale = static_cast<float>(in.scale);

  // The split grid needs a bound on the context; without one it is read from the lengths (a device sync).
  int64_t max_context = in.max_context;
  if (max_context == 0) max_context = in.comp_lengths.add(in.recent_lengths).max().item<int64_t>();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, in.q.get_device()));
  cuda::plan_compressed_decode(p, checked_int(max_context, "max_context"), sms);
  auto partial_out = at::empty({batch, q_heads, p.num_splits, dim}, in.q.options().dtype(at::kFloat));
  auto partial_lse = at::empty({batch, q_heads, p.num_splits}, in.q.options().dtype(at::kFloat));
  p.partial_out = partial_out.data_ptr<float>();
  p.partial_lse = partial_lse.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::launch_compressed_decode(kernel_dtype(in.q.scalar_type()), p, stream));
  return {out, lse};
}

}  // namespace sparse_attn

#endif  // SPARSE_ATTN_WITH_CUDA
