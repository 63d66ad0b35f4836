// Tasks of a kernel split between torch's threads so that a slow core does not hold up a fast one.
//
// Each thread takes three quarters of its even share as one contiguous run of tasks (so that its stream of
// weights runs on from block to block), and the rest one task at a time from a shared counter. On a shared
// machine one core is often slower than the other for a while; with even shares the faster thread waited
// for it at the end of every call (perf of the 33 linear calls at 16 float32 rows: the second thread idle
// for a fifth of the time, about 12% of it beyond the main thread's own dispatch of the calls). Which thread
// computes a task never changes what the task computes.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace clex_cpu {

// per_thread(for_each) runs once on every thread taking part: it may set up what the thread keeps between
// tasks, then calls for_each(run), which calls run(task) for each of the thread's tasks in [0, tasks).
template <typename PerThread>
void parallel_tasks(int64_t tasks, const PerThread& per_thread) {
  if (tasks <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  const int64_t share = tasks * 3 / 4 / workers;
  std::atomic<int64_t> next{share * workers};
  at::parallel_for(0, workers, 1, [&](int64_t first_worker, int64_t last_worker) {
    per_thread([&](const auto& run) {
      for (int64_t worker = first_worker; worker < last_worker; ++worker)
        for (int64_t task = worker * share; task < (worker + 1) * share; ++task) run(task);
      for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) run(task);
    });
  });
}

}  // namespace clex_cpu
