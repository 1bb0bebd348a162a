// Controls of the CUDA emulation's launches for the code that drives it (the torch entry points, tests), without
// the device-side names of cuda_emulation.h.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace sparse_attn::emu {

// The message of the calling thread's last failed launch.
std::string last_error_message();

// Test hooks, set between launches: make the __syncthreads at file (a suffix of the path) and line return without
// waiting, to show that the tests catch the race it leaves (line -1: none); calls skipped since it was set.
void drop_barrier(const std::string& file_suffix, int line);
long dropped_barrier_calls();
// Seconds without any barrier completing before a launch is declared stuck (default 60).
void set_stall_timeout(double seconds);
// ("file:line", completed block barriers at that __syncthreads) since the last reset: which sites ran.
std::vector<std::pair<std::string, long>> barrier_site_counts();
void reset_barrier_site_counts();

}  // namespace sparse_attn::emu
