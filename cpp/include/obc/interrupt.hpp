// InterruptHook: polled by the core between units of work, implemented by hosts.
#pragma once

#include <chrono>

namespace obc {

/// Hosts implement this to stop long computations (Ctrl-C in Python, a timeout in C++).
/// The core calls should_stop() from the thread that called the solver only, between
/// rows (or between steps of structured pruning), at most every `poll_interval_ms`.
/// When it returns true the solver throws obc::Interrupted and returns no partial result.
class InterruptHook {
 public:
  virtual ~InterruptHook() = default;
  /// Return true to stop. Called with no locks held by the core.
  virtual bool should_stop() = 0;
};

/// A timeout for C++ hosts: stops the computation once `deadline` has passed.
/// Usage: `obc::DeadlineInterrupt timeout(std::chrono::seconds(30)); run.interrupt = &timeout;`
/// then catch obc::Interrupted. The deadline is checked whenever the core polls (see
/// InterruptHook), so the solver stops within about one poll interval plus one row of work.
class DeadlineInterrupt : public InterruptHook {
 public:
  using Clock = std::chrono::steady_clock;
  /// Stops once `timeout` has elapsed from construction.
  explicit DeadlineInterrupt(Clock::duration timeout) : deadline_(Clock::now() + timeout) {}
  /// Stops once the steady clock reaches `deadline`.
  explicit DeadlineInterrupt(Clock::time_point deadline) : deadline_(deadline) {}
  bool should_stop() override { return Clock::now() >= deadline_; }
  Clock::time_point deadline() const { return deadline_; }

 private:
  Clock::time_point deadline_;
};

/// Options shared by every solver: threading, interruption, kernel tuning.
struct RunOptions {
  /// Worker threads; 0 = OpenMP's default (omp_get_max_threads()). Results do not depend on it.
  int num_threads = 0;
  /// Optional interrupt hook, not owned; may be null.
  InterruptHook* interrupt = nullptr;
  /// Lazy batch size B of the row kernels: rank-1 downdates kept as a thin cols x B matrix and
  /// applied to the inverse Hessian every B steps (level-3). 0 = automatic. Valid: 0 or 1..1024.
  int lazy_batch = 0;
};

}  // namespace obc
