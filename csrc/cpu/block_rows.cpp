// Block rows from a boolean block matrix on the CPU: the compression every mask builder ends with
// (BlockSparseMask.from_block_bool). Row r of keep [rows, nk] becomes counts[r] = its kept blocks and
// indices[r, :counts[r]] = their ids ascending, zero past the count; the width is the largest count (at least 1).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "../ops.h"

namespace sparse_attn {

std::tuple<at::Tensor, at::Tensor> block_rows_cpu(const at::Tensor& keep) {
  const int64_t nk = keep.size(-1), rows = nk ? keep.numel() / nk : 0;
  std::vector<int64_t> sizes(keep.sizes().begin(), keep.sizes().end() - 1);
  auto counts = at::empty(sizes, keep.options().dtype(at::kInt));
  const bool* k = keep.data_ptr<bool>();
  int32_t* c = counts.data_ptr<int32_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bool* row = k + r * nk;
      int32_t n = 0;
      for (int64_t j = 0; j < nk; ++j) n += row[j];
      c[r] = n;
    }
  });
  const int64_t width = std::max<int64_t>(1, rows ? *std::max_element(c, c + rows) : 0);
  sizes.push_back(width);
  auto indices = at::zeros(sizes, keep.options().dtype(at::kInt));
  int32_t* out = indices.data_ptr<int32_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bool* row = k + r * nk;
      int32_t* dst = out + r * width;
      for (int64_t j = 0; j < nk; ++j) {
        if (row[j]) *dst++ = static_cast<int32_t>(j);
      }
    }
  });
  return {counts, indices};
}

}  // namespace sparse_attn
