// InterruptHook: polled by the core between units of work, implemented by hosts.
#pragma once

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
