// Writes rows into slots of a paged cache on the CPU: row i of src goes to slot slots[i] of dst (negative slots are
// padding and skipped). One pass, no temporaries: the per-layer K/V (and label) write of a serving step; with KV
// pruning, each token's K and V pruned and packed into its slot in the same pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

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

namespace {

// Prunes one vector x[0, dim) to its `keep` largest magnitudes (ties: the lower channel; NaN ranks above every
// number, as in a descending torch.sort) and writes the kept values in channel order to `values` and the keep
// bitmap (bit c % 8 of byte c / 8) to `bits`.
template <typename T>
void prune_vector(const T* x, int64_t dim, int64_t keep, T* values, uint8_t* bits) {
  int32_t order[256];
  float mag[256];
  for (int64_t c = 0; c < dim; ++c) {
    const float a = std::fabs(static_cast<float>(x[c]));
    mag[c] = a != a ? std::numeric_limits<float>::infinity() : a;
    order[c] = static_cast<int32_t>(c);
  }
  auto before = [&](int32_t i, int32_t j) {  // the kept order: NaN, then larger |x|, then the lower channel
    const bool ni = x[i] != x[i], nj = x[j] != x[j];
    if (ni != nj) return ni;
    return mag[i] != mag[j] ? mag[i] > mag[j] : i < j;
  };
  if (keep < dim) std::nth_element(order, order + keep, order + dim, before);
  bool kept[256] = {};
  for (int64_t i = 0; i < keep; ++i) kept[order[i]] = true;
  std::memset(bits, 0, (dim + 7) / 8);
  for (int64_t c = 0, w = 0; c < dim; ++c) {
    if (!kept[c]) continue;
    values[w++] = x[c];
    bits[c / 8] |= uint8_t(1u << (c % 8));
  }
}

}  // namespace

void write_pruned_slots_cpu(at::Tensor& dst, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v,
                            int64_t keep) {
  const int64_t n = slots.size(0), heads = dst.size(1), width = dst.size(2), dim = k.size(2);
  const int64_t bitmap_bytes = (dim + 7) / 8;
  const int64_t* slot = slots.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "write_pruned_slots_cpu", [&] {
    scalar_t* out = dst.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        if (slot[i] < 0) continue;
        for (int64_t h = 0; h < heads; ++h) {
          // Slot: [K's kept values | V's | K's bitmap bytes | V's | zero padding to the slot's width].
          scalar_t* row = out + slot[i] * dst.stride(0) + h * dst.stride(1);
          uint8_t* raw = reinterpret_cast<uint8_t*>(row + 2 * keep);
          std::memset(raw, 0, (width - 2 * keep) * sizeof(scalar_t));
          prune_vector(kp + i * k.stride(0) + h * k.stride(1), dim, keep, row, raw);
          prune_vector(vp + i * v.stride(0) + h * v.stride(1), dim, keep, row + keep, raw + bitmap_bytes);
        }
      }
    });
  });
}

}  // namespace sparse_attn
