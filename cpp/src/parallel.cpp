// parallel_for (dynamic hand-out) and parallel_for_static (fixed ranges): independent items over
// OpenMP threads, interruptible.
#include "obc/parallel.hpp"

#include <atomic>
#include <chrono>
#include <exception>
#include <limits>
#include <mutex>

#include "obc/errors.hpp"

#ifdef OBC_HAVE_OPENMP
#include <omp.h>
#endif

namespace obc {

int resolve_num_threads(int requested) {
  OBC_CHECK(requested >= 0 && requested <= kMaxThreads, "num_threads: expected an integer in [0, ",
            kMaxThreads, "] (0 = default), got ", requested);
#ifdef OBC_HAVE_OPENMP
  return requested == 0 ? omp_get_max_threads() : requested;
#else
  return 1;
#endif
}

namespace {

// Runs fn over [0, count) on up to `threads` threads. next_item(thread_id, team, cursor) yields
// a thread's next item, or `count` when it has none left; team is the number of threads OpenMP
// actually started (it may start fewer than asked for), cursor that thread's own state (-1 at
// first).
template <class NextItem>
void run_items(Index count, int threads, InterruptHook* hook,
               const std::function<void(Index, int)>& fn, NextItem next_item) {
  std::atomic<bool> stop{false};
  std::atomic<bool> interrupted{false};
  std::mutex error_mutex;
  std::exception_ptr first_error;
  Index first_error_item = std::numeric_limits<Index>::max();

  auto worker = [&](int thread_id, int team) {
    using clock = std::chrono::steady_clock;
    auto last_poll = clock::now();
    Index cursor = -1;
    while (!stop.load(std::memory_order_relaxed)) {
      const Index item = next_item(thread_id, team, cursor);
      if (item >= count) break;
      try {
        fn(item, thread_id);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (item < first_error_item) {
          first_error_item = item;
          first_error = std::current_exception();
        }
        stop.store(true);
      }
      // Only the calling thread talks to the host (Python needs its own thread for signals).
      if (thread_id == 0 && hook != nullptr) {
        const auto now = clock::now();
        if (now - last_poll > std::chrono::milliseconds(50)) {
          last_poll = now;
          if (hook->should_stop()) {
            interrupted.store(true);
            stop.store(true);
          }
        }
      }
    }
  };

#ifdef OBC_HAVE_OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    worker(omp_get_thread_num(), omp_get_num_threads());
  } else {
    worker(0, 1);
  }
#else
  worker(0, 1);
#endif
  if (first_error) std::rethrow_exception(first_error);
  if (interrupted.load()) throw Interrupted();
  if (hook != nullptr && hook->should_stop()) throw Interrupted();
}

}  // namespace

void parallel_for(Index count, int num_threads, InterruptHook* hook,
                  const std::function<void(Index, int)>& fn) {
  if (count <= 0) return;
  const int threads = static_cast<int>(std::min<Index>(resolve_num_threads(num_threads), count));
  std::atomic<Index> next{0};
  run_items(count, threads, hook, fn, [&](int, int, Index&) {
    return next.fetch_add(1, std::memory_order_relaxed);
  });
}

void parallel_for_static(Index count, int num_threads, InterruptHook* hook,
                         const std::function<void(Index, int)>& fn) {
  if (count <= 0) return;
  const int threads = static_cast<int>(std::min<Index>(resolve_num_threads(num_threads), count));
  run_items(count, threads, hook, fn, [&](int thread_id, int team, Index& cursor) {
    const Index end = (thread_id + 1) * count / team;
    cursor = cursor < 0 ? thread_id * count / team : cursor + 1;
    return cursor < end ? cursor : count;
  });
}

}  // namespace obc
