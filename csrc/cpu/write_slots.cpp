// Writes rows into slots of a paged cache on the CPU: row i of src goes to slot slots[i] of dst (negative slots are
// padding and skipped). One pass, no temporaries: the per-layer K/V (and label) write of a serving step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "../ops.h"

namespace sparse_attn {

void write_slots_cpu(at::Tensor& dst, const at::Tensor& slots, const at::Tensor& src) {
  const int64_t n = slots.size(0), heads = dst.size(1), width = dst.size(2);
  const int64_t d_slot = dst.stride(0), d_head = dst.stride(1), s_row = src.stride(0), s_head = src.stride(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "write_slots_cpu", [&] {
    scalar_t* out = dst.data_ptr<scalar_t>();
    const scalar_t* in = src.data_ptr<scalar_t>();
    // Rows are few (a decode step writes one per sequence) and short: threads only pay off for long prompts.
    at::parallel_for(0, n, 256, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        if (slot[i] < 0) continue;
        for (int64_t h = 0; h < heads; ++h) {
          std::memcpy(out + slot[i] * d_slot + h * d_head, in + i * s_row + h * s_head, width * sizeof(scalar_t));
        }
      }
    });
  });
}

}  // namespace sparse_attn
