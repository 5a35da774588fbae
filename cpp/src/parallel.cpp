// parallel_for: dynamic hand-out of independent items over OpenMP threads, interruptible.
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
  OBC_CHECK(requested >= 0, "num_threads: expected >= 0 (0 = default), got ", requested);
#ifdef OBC_HAVE_OPENMP
  return requested == 0 ? omp_get_max_threads() : requested;
#else
  return 1;
#endif
}

void parallel_for(Index count, int num_threads, InterruptHook* hook,
                  const std::function<void(Index, int)>& fn) {
  if (count <= 0) return;
  const int threads = static_cast<int>(std::min<Index>(resolve_num_threads(num_threads), count));
  std::atomic<Index> next{0};
  std::atomic<bool> stop{false};
  std::atomic<bool> interrupted{false};
  std::mutex error_mutex;
  std::exception_ptr first_error;
  Index first_error_item = std::numeric_limits<Index>::max();

  auto worker = [&](int thread_id) {
    using clock = std::chrono::steady_clock;
    auto last_poll = clock::now();
    while (!stop.load(std::memory_order_relaxed)) {
      const Index item = next.fetch_add(1, std::memory_order_relaxed);
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
    worker(omp_get_thread_num());
  } else {
    worker(0);
  }
#else
  worker(0);
#endif
  if (first_error) std::rethrow_exception(first_error);
  if (interrupted.load()) throw Interrupted();
  if (hook != nullptr && hook->should_stop()) throw Interrupted();
}

}  // namespace obc
