// The one parallel loop over independent work items (rows, column chunks).
#pragma once

#include <functional>

#include "obc/interrupt.hpp"
#include "obc/types.hpp"

namespace obc {

/// The most threads a call may ask for. Far above any core count this library is built for; a
/// larger request is a mistake (libgomp aborts the process when it cannot start the threads),
/// so it throws InvalidArgument instead. The C API's OBC_MAX_THREADS and Python's
/// obc_native._arrays.MAX_THREADS have the same value.
inline constexpr int kMaxThreads = 1024;

/// Number of threads a call with `requested` (0 = default, else 1..kMaxThreads) will use.
/// Throws InvalidArgument outside [0, kMaxThreads].
int resolve_num_threads(int requested);

/// Runs fn(item, thread_id) for item in [0, count). Items are handed out dynamically, so
/// results must not depend on which thread runs an item (no cross-item float reductions).
/// The calling thread polls `hook` between items; on a stop, no new item starts and
/// obc::Interrupted is thrown. An exception thrown by fn stops the loop and the one from
/// the lowest item index is rethrown after all threads finish.
/// thread_id is in [0, resolve_num_threads(num_threads)), usable to index workspaces.
void parallel_for(Index count, int num_threads, InterruptHook* hook,
                  const std::function<void(Index item, int thread_id)>& fn);

/// The same with a fixed hand-out: when T threads start, thread t runs the items
/// [t * count / T, (t + 1) * count / T) in order. For loops repeated step after step over the
/// same data (the column ranges of structured pruning): each thread keeps working on the same
/// part, which then stays in its core's cache (a dynamic hand-out moves it about).
/// Results must still not depend on the thread that runs an item.
void parallel_for_static(Index count, int num_threads, InterruptHook* hook,
                         const std::function<void(Index item, int thread_id)>& fn);

}  // namespace obc
