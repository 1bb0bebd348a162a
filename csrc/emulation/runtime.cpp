// The launch machinery of the CUDA emulation (cuda_emulation.h): one OS thread per CUDA thread, block and warp
// barriers, the stall watchdog and CUDA-style error reporting.
#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace sparse_attn::emu {
namespace {

constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // without the opt-in attribute
constexpr int kMaxDynamicSmem = 227 * 1024;       // sm_90's opt-in limit per block
constexpr size_t kThreadStack = 1 << 20;

// A reusable barrier with a phase counter. Threads that finish leave it (arrive_and_drop), so the others are not
// held by them, as exited threads do not hold a GPU's barrier.
class Barrier {
 public:
  void reset(int count) {
    expected_.store(count);
    remaining_.store(count);
  }

  // Waits until every expected thread has arrived; true for the arrival that completed the phase.
  bool arrive_and_wait(const std::atomic<bool>& aborted) {
    const uint32_t phase = phase_.load(std::memory_order_acquire);
    if (aborted.load(std::memory_order_acquire)) throw Aborted{};
    if (arrive()) return true;
    while (phase_.load(std::memory_order_acquire) == phase) phase_.wait(phase, std::memory_order_acquire);
    if (aborted.load(std::memory_order_acquire)) throw Aborted{};
    return false;
  }

  void arrive_and_drop() {
    expected_.fetch_sub(1, std::memory_order_acq_rel);
    arrive();
  }

  // Wakes every waiter without completing the phase (they find the launch aborted).
  void release() {
    phase_.fetch_add(1, std::memory_order_acq_rel);
    phase_.notify_all();
  }

  int waiting() const { return expected_.load() - remaining_.load(); }

 private:
  bool arrive() {
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) != 1) return false;
    remaining_.store(expected_.load(std::memory_order_acquire), std::memory_order_relaxed);
    phase_.fetch_add(1, std::memory_order_release);
    phase_.notify_all();
    return true;
  }

  std::atomic<int> expected_{0}, remaining_{0};
  std::atomic<uint32_t> phase_{0};
};

struct Warp {
  Barrier barrier;
  uint64_t slots[2][32];  // double-buffered: exchange n uses slots[n % 2] (see warp_exchange)
  unsigned tags[2][32];   // the exchange number each lane wrote, to find lanes that did not take part
  unsigned lanes = 0;     // bit mask of the lanes that exist
  int size = 0;
};

struct Launch {
  dim3 grid, block;
  int threads = 0;
  long blocks = 0;
  size_t smem_bytes = 0;
  std::unique_ptr<std::max_align_t[]> smem;
  Barrier block_barrier, between_blocks;
  std::unique_ptr<Warp[]> warps;
  int num_warps = 0;
  const std::function<void()>* body = nullptr;

  std::atomic<bool> aborted{false};
  std::atomic<uint64_t> progress{0};  // barrier completions, for the watchdog
  std::mutex mutex;
  std::condition_variable all_finished;
  int finished = 0;
  std::string error;

  void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (error.empty()) error = message;
    }
    aborted.store(true, std::memory_order_release);
    block_barrier.release();
    between_blocks.release();
    for (int w = 0; w < num_warps; ++w) warps[w].barrier.release();
  }

  void wait(Barrier& barrier) {
    if (barrier.arrive_and_wait(aborted)) progress.fetch_add(1, std::memory_order_relaxed);
  }

  // Fresh per-block state: barriers at full strength, exchange tags cleared, shared memory poisoned.
  void prepare_block() {
    block_barrier.reset(threads);
    for (int w = 0; w < num_warps; ++w) {
      warps[w].barrier.reset(warps[w].size);
      std::memset(warps[w].tags, 0xff, sizeof(warps[w].tags));
    }
    std::memset(smem.get(), 0xff, smem_bytes);
  }

  std::string describe_stall() {
    int at_warp_ops = 0;
    for (int w = 0; w < num_warps; ++w) at_warp_ops += warps[w].barrier.waiting();
    std::ostringstream out;
    out << "of " << threads << " threads, " << block_barrier.waiting() << " wait at __syncthreads and " << at_warp_ops
        << " at warp operations (block size " << block.x << "x" << block.y << "x" << block.z << ")";
    return out.str();
  }
};

struct Lane {
  Launch* launch = nullptr;
  Warp* warp = nullptr;
  int lane = 0;
  unsigned ops = 0;  // warp exchanges so far in this block
};
thread_local Lane current_lane;

thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_message;

std::mutex config_mutex;  // guards the settings below between launches
std::map<const void*, int> max_dynamic_smem;
std::string dropped_file;
int dropped_line = -1;
std::atomic<long> dropped_calls{0};
double stall_timeout_s = 60.0;
std::mutex sites_mutex;
std::map<std::string, long> site_counts;

std::mutex launch_mutex;  // one launch at a time: static __shared__ variables are process-wide

uint3 unflatten(long index, dim3 extent) {
  const unsigned x = static_cast<unsigned>(index % extent.x);
  index /= extent.x;
  return {x, static_cast<unsigned>(index % extent.y), static_cast<unsigned>(index / extent.y)};
}

bool ends_with(const char* text, const std::string& suffix) {
  const size_t n = std::strlen(text);
  return n >= suffix.size() && suffix.compare(0, suffix.size(), text + n - suffix.size()) == 0;
}

void run_thread(Launch& launch, int tid) {
  current_thread.block_dim = launch.block;
  current_thread.grid_dim = launch.grid;
  current_thread.thread_idx = unflatten(tid, launch.block);
  Warp& warp = launch.warps[tid / 32];
  current_lane = Lane{&launch, &warp, tid % 32, 0};
  try {
    for (long b = 0; b < launch.blocks; ++b) {
      current_thread.block_idx = unflatten(b, launch.grid);
      current_lane.ops = 0;
      try {
        (*launch.body)();
      } catch (const Aborted&) {
        throw;
      } catch (const std::exception& exc) {
        launch.fail(std::string("a thread threw: ") + exc.what());
        throw Aborted{};
      }
      // Done with this block: leave its barriers, then wait for the whole block before the next one starts.
      launch.block_barrier.arrive_and_drop();
      warp.barrier.arrive_and_drop();
      if (b + 1 == launch.blocks) break;
      launch.wait(launch.between_blocks);
      if (tid == 0) launch.prepare_block();
      launch.wait(launch.between_blocks);
    }
  } catch (const Aborted&) {
  }
  std::lock_guard<std::mutex> lock(launch.mutex);
  if (++launch.finished == launch.threads) launch.all_finished.notify_all();
}

struct ThreadStart {
  Launch* launch;
  int tid;
};

void* thread_main(void* arg) {
  const auto* start = static_cast<ThreadStart*>(arg);
  run_thread(*start->launch, start->tid);
  return nullptr;
}

cudaError_t set_error(cudaError_t error, const std::string& message) {
  last_error = error;
  last_message = message;
  return error;
}

}  // namespace

void syncthreads(const char* file, int line) {
  if (line == dropped_line && ends_with(file, dropped_file)) {
    dropped_calls.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  Launch& launch = *current_lane.launch;
  if (launch.block_barrier.arrive_and_wait(launch.aborted)) {
    launch.progress.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(sites_mutex);
    ++site_counts[std::string(file) + ":" + std::to_string(line)];
  }
}

// Exchange n writes slots[n % 2] and waits for the warp; a lane reads before it arrives at exchange n + 1, and
// exchange n + 2 (the next writer of the same slots) starts only after every lane has arrived at n + 1.
const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* what) {
  Lane& me = current_lane;
  Launch& launch = *me.launch;
  Warp& warp = *me.warp;
  const int warp_index = static_cast<int>(&warp - launch.warps.get());
  if (mask != 0xffffffffu && mask != warp.lanes) {
    std::ostringstream out;
    out << what << " with mask 0x" << std::hex << mask << " in warp " << std::dec << warp_index
        << ": only full-warp masks are emulated";
    launch.fail(out.str());
    throw Aborted{};
  }
  const unsigned op = me.ops++;
  const int parity = op & 1;
  warp.slots[parity][me.lane] = value;
  warp.tags[parity][me.lane] = op;
  launch.wait(warp.barrier);
  for (int lane = 0; lane < warp.size; ++lane) {
    if (warp.tags[parity][lane] != op) {
      std::ostringstream out;
      out << what << " in warp " << warp_index << " of block (" << blockIdx.x << ", " << blockIdx.y << ", "
          << blockIdx.z << "): lane " << lane << " did not take part (it returned, or is at another warp operation)";
      launch.fail(out.str());
      throw Aborted{};
    }
  }
  return warp.slots[parity];
}

int lane_id() { return current_lane.lane; }

void* dynamic_shared_memory() { return current_lane.launch->smem.get(); }

void run_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> serial(launch_mutex);  // errors stay until read, as in CUDA: a success clears none
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > kMaxThreadsPerBlock || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.y > 65535 || grid.z > 65535) {
    std::ostringstream out;
    out << "invalid launch configuration: grid " << grid.x << "x" << grid.y << "x" << grid.z << ", block " << block.x
        << "x" << block.y << "x" << block.z;
    set_error(cudaErrorInvalidConfiguration, out.str());
    return;
  }
  double timeout_s;
  {
    std::lock_guard<std::mutex> lock(config_mutex);
    const auto it = max_dynamic_smem.find(kernel);
    const size_t opted_in = it == max_dynamic_smem.end() ? 0 : static_cast<size_t>(it->second);
    const size_t allowed = std::max(kDefaultDynamicSmem, opted_in);
    if (dynamic_smem > allowed) {
      set_error(cudaErrorInvalidValue, "dynamic shared memory of " + std::to_string(dynamic_smem) +
                                           " bytes exceeds the kernel's limit of " + std::to_string(allowed) +
                                           " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
      return;
    }
    timeout_s = stall_timeout_s;
  }

  Launch launch;
  launch.grid = grid;
  launch.block = block;
  launch.threads = static_cast<int>(threads);
  launch.blocks = static_cast<long>(grid.x) * grid.y * grid.z;
  launch.smem_bytes = dynamic_smem;
  launch.smem.reset(new std::max_align_t[dynamic_smem / sizeof(std::max_align_t) + 1]);
  launch.num_warps = (launch.threads + 31) / 32;
  launch.warps.reset(new Warp[launch.num_warps]);
  for (int w = 0; w < launch.num_warps; ++w) {
    launch.warps[w].size = std::min(32, launch.threads - 32 * w);
    launch.warps[w].lanes = launch.warps[w].size == 32 ? 0xffffffffu : (1u << launch.warps[w].size) - 1;
  }
  launch.between_blocks.reset(launch.threads);
  launch.body = &body;
  launch.prepare_block();

  std::vector<ThreadStart> starts(launch.threads);
  std::vector<pthread_t> ids;
  ids.reserve(launch.threads);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, kThreadStack);
  for (int t = 0; t < launch.threads; ++t) {
    starts[t] = ThreadStart{&launch, t};
    pthread_t id;
    if (pthread_create(&id, &attr, thread_main, &starts[t]) != 0) {
      launch.fail("could not start thread " + std::to_string(t) + " of " + std::to_string(launch.threads));
      std::lock_guard<std::mutex> lock(launch.mutex);
      launch.finished += launch.threads - t;  // never started
      break;
    }
    ids.push_back(id);
  }
  pthread_attr_destroy(&attr);

  // Watchdog: a launch in which no barrier completes for timeout_s is stuck (threads wait where others never come).
  {
    std::unique_lock<std::mutex> lock(launch.mutex);
    uint64_t seen = launch.progress.load();
    auto since = std::chrono::steady_clock::now();
    while (!launch.all_finished.wait_for(lock, std::chrono::milliseconds(200),
                                         [&] { return launch.finished == launch.threads; })) {
      const uint64_t now_progress = launch.progress.load();
      const auto now = std::chrono::steady_clock::now();
      if (now_progress != seen) {
        seen = now_progress;
        since = now;
      } else if (!launch.aborted.load() && std::chrono::duration<double>(now - since).count() > timeout_s) {
        lock.unlock();
        launch.fail("stalled: no barrier completed for " + std::to_string(timeout_s) + " s; " +
                    launch.describe_stall());
        lock.lock();
      }
    }
  }
  for (pthread_t id : ids) pthread_join(id, nullptr);
  if (!launch.error.empty()) set_error(cudaErrorLaunchFailure, launch.error);
}

cudaError_t set_max_dynamic_shared_memory(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kMaxDynamicSmem) {
    return set_error(cudaErrorInvalidValue, "cudaFuncAttributeMaxDynamicSharedMemorySize of " +
                                                std::to_string(bytes) + " exceeds " + std::to_string(kMaxDynamicSmem));
  }
  std::lock_guard<std::mutex> lock(config_mutex);
  max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

std::string last_error_message() { return last_message; }

void drop_barrier(const std::string& file_suffix, int line) {
  std::lock_guard<std::mutex> lock(config_mutex);
  dropped_file = file_suffix;
  dropped_line = line;
  dropped_calls.store(0);
}

long dropped_barrier_calls() { return dropped_calls.load(); }

void set_stall_timeout(double seconds) {
  std::lock_guard<std::mutex> lock(config_mutex);
  stall_timeout_s = seconds;
}

std::vector<std::pair<std::string, long>> barrier_site_counts() {
  std::lock_guard<std::mutex> lock(sites_mutex);
  return {site_counts.begin(), site_counts.end()};
}

void reset_barrier_site_counts() {
  std::lock_guard<std::mutex> lock(sites_mutex);
  site_counts.clear();
}

}  // namespace sparse_attn::emu

cudaError_t cudaGetLastError() {
  const cudaError_t error = sparse_attn::emu::last_error;
  sparse_attn::emu::last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError() { return sparse_attn::emu::last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
