// CPU execution harness for the CUDA kernels of csrc/cuda: the same .cu sources, compiled by the host compiler
// against this header instead of the CUDA toolkit's, run on the CPU with the launch's real thread structure.
//
// A launch runs synchronously, one at a time, its blocks one after another; each block's threads are real OS threads
// (as many as the launch asks for), so the kernel's own synchronisation is what orders them:
// - __syncthreads is a barrier of the block's threads (a thread that returns stops counting, as on the GPU);
// - warp shuffles and votes exchange values through a per-warp buffer and a barrier of the warp's 32 lanes, so
//   every lane named by the mask must arrive (only full-warp masks are modelled; others fail the launch);
// - static __shared__ variables are function-local statics (blocks do not overlap, so one copy serves every
//   block; unlike a GPU's they keep their values from one block to the next), dynamic shared memory is one buffer
//   per launch, filled with 0xff bytes (NaN as float) before every block so reads of unwritten memory show;
// - atomics are std::atomic_ref operations; __expf and friends are the libm functions (more accurate than the GPU's
//   approximations); __half / __nv_bfloat16 convert with round-to-nearest-even.
// A race or a missing barrier therefore shows as it would on a GPU: as wrong results that depend on the
// interleaving. A launch whose threads stop making progress (a barrier that not every thread reaches) fails after
// a timeout with a description of where the threads wait. Launch errors follow CUDA (configuration limits, dynamic
// shared memory over 48 KiB without the opt-in attribute, at most 227 KiB as on sm_90) and are reported through
// cudaGetLastError, with a message from sparse_attn::emu::last_error_message().
#pragma once

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emulation_control.h"
#include "include/cuda_runtime_api.h"

// ------------------------------------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__

namespace sparse_attn::emu {

// ------------------------------------------------------------------------------------------- runtime state
// Thrown out of a barrier when the launch is aborted (an error in another thread, or the watchdog); the launcher
// catches it. Kernel code never sees it unless it catches everything.
struct Aborted {};

// Per-thread position within the running launch (set by the launcher; read through the built-in variables).
struct ThreadState {
  uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
};
inline thread_local ThreadState current_thread;

// Block barrier of the calling thread's block; `file` and `line` name the __syncthreads call site.
void syncthreads(const char* file, int line);
// One full-warp exchange: every lane of the calling thread's warp writes `value` (at most 8 bytes) and, once all
// lanes have written, reads the 32 values from the returned buffer (valid until the lane's next warp operation).
const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* what);
int lane_id();
void* dynamic_shared_memory();
template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_memory());
}

// Runs `body` once per thread of every block of the grid (see the file comment). `kernel` identifies the function
// for cudaFuncSetAttribute's limits. Sets the calling thread's last error.
void run_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t,
            Args&&... args) {
  // Arguments are converted to the kernel's parameter types once, as a launch copies them to the device.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_launch(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem, [&] { std::apply(kernel, params); });
}

cudaError_t set_max_dynamic_shared_memory(const void* kernel, int bytes);

template <typename T>
T shuffle_read(const uint64_t* slots, int lane) {
  T value;
  std::memcpy(&value, &slots[lane], sizeof(T));
  return value;
}

template <typename T>
uint64_t shuffle_write(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffles move at most 8 bytes");
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  return slot;
}

// First lane of the width-sized segment of the warp that holds `lane`.
inline int segment_base(int lane, int width) { return lane & ~(width - 1); }

}  // namespace sparse_attn::emu

// ------------------------------------------------------------------------------------------- built-in variables
#define threadIdx (::sparse_attn::emu::current_thread.thread_idx)
#define blockIdx (::sparse_attn::emu::current_thread.block_idx)
#define blockDim (::sparse_attn::emu::current_thread.block_dim)
#define gridDim (::sparse_attn::emu::current_thread.grid_dim)
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------- synchronisation
#define __syncthreads() ::sparse_attn::emu::syncthreads(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) { ::sparse_attn::emu::warp_exchange(mask, 0, "__syncwarp"); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  namespace e = ::sparse_attn::emu;
  const uint64_t* slots = e::warp_exchange(mask, e::shuffle_write(var), "__shfl_sync");
  const int lane = e::lane_id();
  return e::shuffle_read<T>(slots, e::segment_base(lane, width) + (src_lane & (width - 1)));
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  namespace e = ::sparse_attn::emu;
  const uint64_t* slots = e::warp_exchange(mask, e::shuffle_write(var), "__shfl_up_sync");
  const int lane = e::lane_id(), src = lane - static_cast<int>(delta);
  return src < e::segment_base(lane, width) ? var : e::shuffle_read<T>(slots, src);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  namespace e = ::sparse_attn::emu;
  const uint64_t* slots = e::warp_exchange(mask, e::shuffle_write(var), "__shfl_down_sync");
  const int lane = e::lane_id(), src = lane + static_cast<int>(delta);
  return src >= e::segment_base(lane, width) + width ? var : e::shuffle_read<T>(slots, src);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  namespace e = ::sparse_attn::emu;
  const uint64_t* slots = e::warp_exchange(mask, e::shuffle_write(var), "__shfl_xor_sync");
  const int lane = e::lane_id(), src = lane ^ (lane_mask & (warpSize - 1));
  // Lanes may read from earlier width segments but not later ones (they get their own value).
  return e::segment_base(src, width) > e::segment_base(lane, width) ? var : e::shuffle_read<T>(slots, src);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const uint64_t* slots = ::sparse_attn::emu::warp_exchange(mask, predicate != 0, "__ballot_sync");
  unsigned bits = 0;
  for (int lane = 0; lane < warpSize; ++lane) bits |= static_cast<unsigned>(slots[lane] != 0) << lane;
  return bits & mask;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }
inline unsigned __activemask() { return 0xffffffffu; }

// ------------------------------------------------------------------------------------------- atomics
template <typename T>
T atomicAdd(T* address, std::type_identity_t<T> value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicSub(T* address, std::type_identity_t<T> value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <typename T>
T atomicExch(T* address, std::type_identity_t<T> value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;  // the old value, whether or not it was replaced
}
template <typename T>
T atomicMax(T* address, std::type_identity_t<T> value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (old < value && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, std::type_identity_t<T> value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (value < old && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicAnd(T* address, std::type_identity_t<T> value) {
  return std::atomic_ref<T>(*address).fetch_and(value);
}
template <typename T>
T atomicOr(T* address, std::type_identity_t<T> value) {
  return std::atomic_ref<T>(*address).fetch_or(value);
}

// ------------------------------------------------------------------------------------------- integer intrinsics
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// CUDA's device-side min/max overloads (mixed types promote as CUDA's overload set does).
template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ------------------------------------------------------------------------------------------- float intrinsics
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x != x ? 0.0f : std::fmin(std::fmax(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }

// ------------------------------------------------------------------------------------------- half and bfloat16
// Storage types with the GPU's layout (2 bytes), so torch's half and bfloat16 tensors can be read in place.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 0x1f ? sign | 0x7f800000u | (mantissa << 13)  // inf, NaN
                                         : sign | ((exponent + 112) << 23) | (mantissa << 13);
  return __uint_as_float(bits);
}

inline __half __float2half_rn(float x) {
  uint32_t f = __float_as_uint(x);
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  f &= 0x7fffffffu;
  if (f >= 0x7f800000u) return {static_cast<uint16_t>(sign | (f > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (f >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to 65536 or above: inf
  if (f < 0x38800000u) {  // below 2^-14: a half subnormal, |x| * 2^24 rounded to an integer (ties to even)
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(std::fabs(x) * 16777216.0f)))};
  }
  f += 0xfffu + ((f >> 13) & 1u);  // round the 13 dropped bits to nearest, ties to even (a carry bumps the exponent)
  return {static_cast<uint16_t>(sign | ((f - (112u << 23)) >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<uint32_t>(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  const uint32_t f = __float_as_uint(x);
  if ((f & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((f >> 16) | 0x40u)};  // NaN stays quiet NaN
  return {static_cast<uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16)};
}

inline __half __float2half(float x) { return __float2half_rn(x); }
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }

// ------------------------------------------------------------------------------------------- runtime API
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::sparse_attn::emu::set_max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), value);
}
