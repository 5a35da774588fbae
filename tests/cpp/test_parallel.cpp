// Tests for obc/parallel.hpp: every item runs exactly once, the static hand-out's fixed ranges,
// errors and interrupts, for 1..4 threads and item counts around the thread count.
#include "obc/parallel.hpp"

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "obc/errors.hpp"

using namespace obc;

namespace {

using Loop = void (*)(Index, int, InterruptHook*, const std::function<void(Index, int)>&);

struct StopAfter : InterruptHook {
  std::atomic<int> polls{0};
  int after = 0;
  bool should_stop() override { return ++polls > after; }
};

void check_each_item_once(Loop loop) {
  for (int threads : {1, 2, 3, 4})
    for (Index count : {0, 1, 2, 3, 5, 17, 64}) {
      std::vector<std::atomic<int>> runs(static_cast<size_t>(count));
      for (auto& r : runs) r = 0;
      std::atomic<bool> bad_id{false};
      loop(count, threads, nullptr, [&](Index item, int thread_id) {
        if (thread_id < 0 || thread_id >= threads) bad_id = true;
        ++runs[static_cast<size_t>(item)];
      });
      CHECK(!bad_id);
      for (auto& r : runs) CHECK(r == 1);
    }
}

}  // namespace

OBC_TEST(dynamic_runs_each_item_once) { check_each_item_once(&parallel_for); }
OBC_TEST(static_runs_each_item_once) { check_each_item_once(&parallel_for_static); }

OBC_TEST(static_gives_each_thread_one_ascending_range) {
  for (int threads : {2, 3, 4})
    for (Index count : {2, 3, 7, 16, 33}) {
      std::vector<int> owner(static_cast<size_t>(count), -1);
      std::vector<std::vector<Index>> order(static_cast<size_t>(threads));
      parallel_for_static(count, threads, nullptr, [&](Index item, int thread_id) {
        owner[static_cast<size_t>(item)] = thread_id;  // each item written by one thread only
        order[static_cast<size_t>(thread_id)].push_back(item);
      });
      // OpenMP may start fewer threads than asked for; the ranges then split among those.
      int team = 0;
      for (int t = 0; t < threads; ++t) team += order[static_cast<size_t>(t)].empty() ? 0 : 1;
      CHECK(team >= 1);
      for (Index i = 1; i < count; ++i)  // owners are non-decreasing: contiguous ranges
        CHECK(owner[static_cast<size_t>(i)] >= owner[static_cast<size_t>(i - 1)]);
      for (auto& items : order)
        for (size_t k = 1; k < items.size(); ++k) CHECK(items[k] == items[k - 1] + 1);
    }
}

OBC_TEST(lowest_failing_item_is_rethrown) {
  for (Loop loop : {Loop(&parallel_for), Loop(&parallel_for_static)})
    for (int threads : {1, 2, 4}) {
      std::string what;
      try {
        loop(40, threads, nullptr, [&](Index item, int) {
          if (item == 31 || item == 30) throw std::runtime_error("item " + std::to_string(item));
        });
      } catch (const std::runtime_error& e) {
        what = e.what();
      }
      // With several threads the loop may stop before item 31 starts; item 30 always runs
      // before it in its own range (static) or is handed out before it (dynamic).
      CHECK(what == "item 30");
    }
}

OBC_TEST(interrupt_stops_the_loop) {
  // The calling thread polls at most every 50 ms: items of 30 ms, a hook that says stop at once.
  for (Loop loop : {Loop(&parallel_for), Loop(&parallel_for_static)})
    for (int threads : {1, 2}) {
      StopAfter hook;
      std::atomic<int> ran{0};
      CHECK_THROWS(loop(16, threads, &hook,
                        [&](Index, int) {
                          std::this_thread::sleep_for(std::chrono::milliseconds(30));
                          ++ran;
                        }),
                   Interrupted);
      CHECK(ran < 16);
      CHECK(hook.polls >= 1);
    }
}


OBC_TEST(thread_count_is_capped) {
  // A huge request throws instead of asking OpenMP for that many threads (libgomp aborts).
  CHECK(resolve_num_threads(kMaxThreads) >= 1);
  CHECK_THROWS(resolve_num_threads(kMaxThreads + 1), obc::InvalidArgument);
  CHECK_THROWS(resolve_num_threads(1000000), obc::InvalidArgument);
  CHECK_THROWS(resolve_num_threads(-1), obc::InvalidArgument);
  CHECK_THROWS(parallel_for(4, 1000000, nullptr, [](Index, int) {}), obc::InvalidArgument);
}

OBC_TEST_MAIN
