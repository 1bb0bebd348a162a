// Writes rows into slots of a paged cache on the CPU: row i of each source goes to slot slots[i] of dst, the sources
// side by side (negative slots are padding and skipped). One pass, no temporaries: the per-layer K/V (and label)
// write of a serving step; with KV pruning, each token's K and V pruned and packed into its slot in the same pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "../ops.h"
#include "kernel_utils.h"

namespace sparse_attn {

void write_slots_cpu(at::Tensor& dst, const at::Tensor& slots, const std::vector<at::Tensor>& srcs,
                     const at::Tensor& label_src, const at::Tensor& channels) {
  const int64_t n = slots.size(0), heads = dst.size(1), d_slot = dst.stride(0), d_head = dst.stride(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t r = channels.defined() ? channels.size(1) : 0;  // label columns after the sources' (Double Sparsity)
  const int64_t* channel = r ? channels.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "write_slots_cpu", [&] {
    scalar_t* out = dst.data_ptr<scalar_t>();
    // Rows are few (a decode step writes one per sequence) and short: threads only pay off for long prompts.
    at::parallel_for(0, n, 256, [&](int64_t first, int64_t last) {
      int64_t column = 0;
      for (const at::Tensor& src : srcs) {
        const int64_t width = src.size(2), s_row = src.stride(0), s_head = src.stride(1);
        const scalar_t* in = src.data_ptr<scalar_t>();
        for (int64_t i = first; i < last; ++i) {
          if (slot[i] < 0) continue;
          for (int64_t h = 0; h < heads; ++h) {
            std::memcpy(out + slot[i] * d_slot + h * d_head + column, in + i * s_row + h * s_head,
                        width * sizeof(scalar_t));
          }
        }
        column += width;
      }
      if (r == 0) return;
      // The label of head h: label_src[i, h, channels[h, c]] for c < r, the key restricted to its heavy channels.
      const scalar_t* in = label_src.data_ptr<scalar_t>();
      const int64_t s_row = label_src.stride(0), s_head = label_src.stride(1), s_dim = label_src.stride(2);
      for (int64_t i = first; i < last; ++i) {
        if (slot[i] < 0) continue;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* row = out + slot[i] * d_slot + h * d_head + column;
          const scalar_t* key = in + i * s_row + h * s_head;
          for (int64_t c = 0; c < r; ++c) row[c] = key[channel[h * r + c] * s_dim];
        }
      }
    });
  });
}

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// kth_largest_key for dim a multiple of 16 (at most 256) on AVX-512: each pass is one compare and popcount per 16 keys.
SPARSE_ATTN_AVX512 uint32_t kth_largest_key_avx512(const uint32_t* key, int64_t dim, int64_t keep) {
  __m512i keys[16];
  const int64_t n = dim / 16;
  for (int64_t j = 0; j < n; ++j) keys[j] = _mm512_loadu_si512(key + 16 * j);
  uint32_t threshold = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = threshold | (1u << bit);
    const __m512i c = _mm512_set1_epi32(static_cast<int>(candidate));
    int64_t at_least = 0;
    for (int64_t j = 0; j < n; ++j) at_least += __builtin_popcount(_mm512_cmpge_epu32_mask(keys[j], c));
    if (at_least >= keep) threshold = candidate;
  }
  return threshold;
}
#endif

// The keep-th largest of key[0, dim) (1 <= keep <= dim): the largest t with at least `keep` keys >= t, built bit by
// bit from the top.
SPARSE_ATTN_ISA_CLONES
uint32_t kth_largest_key(const uint32_t* key, int64_t dim, int64_t keep) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (dim % 16 == 0 && dim <= 256 && has_avx512()) return kth_largest_key_avx512(key, dim, keep);
#endif
  uint32_t threshold = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = threshold | (1u << bit);
    int32_t at_least = 0;
    for (int64_t c = 0; c < dim; ++c) at_least += key[c] >= candidate;
    if (at_least >= keep) threshold = candidate;
  }
  return threshold;
}

// Prunes one vector x[0, dim) to its `keep` largest magnitudes (ties: the lower channel; NaN ranks above every
// number, as in a descending torch.sort) and writes the kept values in channel order to `values` and the keep
// bitmap (bit c % 8 of byte c / 8) to `bits`. Magnitudes compare as their IEEE bits (monotonic for |x| >= 0; NaN as
// the largest key): after kth_largest_key, one pass in channel order takes the keys above the keep-th largest and as
// many equal to it as fill `keep`.
template <typename T>
void prune_vector(const T* x, int64_t dim, int64_t keep, T* values, uint8_t* bits) {
  uint32_t key[256];
  for (int64_t c = 0; c < dim; ++c) {
    const float a = std::fabs(static_cast<float>(x[c]));
    uint32_t k;
    std::memcpy(&k, &a, sizeof(k));
    key[c] = a != a ? std::numeric_limits<uint32_t>::max() : k;
  }
  uint32_t threshold = 0;
  int64_t ties = dim;  // keys equal to the threshold still to take
  if (keep < dim) {
    threshold = kth_largest_key(key, dim, keep);
    int64_t above = 0;
    for (int64_t c = 0; c < dim; ++c) above += key[c] > threshold;
    ties = keep - above;
  }
  std::memset(bits, 0, (dim + 7) / 8);
  for (int64_t c = 0, w = 0; c < dim; ++c) {
    if (key[c] < threshold || (key[c] == threshold && ties-- <= 0)) continue;
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
