// ThreadPool: the size it picks (ATMOE_THREADS clamped to the affinity mask, the default
// divided among the MPI ranks of a node), and that run / run_dynamic / parallel_for /
// barrier do every piece of work exactly once, also with far more threads than cores.
// No timing assertions: a watchdog only turns a hang into a failure.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/thread_pool.h"

namespace atmoe::test {
namespace {

// Ends the process when a test body outlives `limit` (a deadlock would hang ctest).
class Watchdog {
 public:
  explicit Watchdog(std::chrono::seconds limit) {
    t_ = std::thread([this, limit] {
      std::unique_lock<std::mutex> lk(mu_);
      if (!cv_.wait_for(lk, limit, [&] { return done_; })) {
        std::fprintf(stderr, "watchdog: test still running after %llds (deadlock?)\n", (long long)limit.count());
        std::_Exit(1);
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_ = true;
    }
    cv_.notify_all();
    t_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread t_;
};

// Sets (or unsets, for nullopt) environment variables for one scope.
class EnvGuard {
 public:
  void set(const char* name, std::optional<std::string> value) {
    const char* old = std::getenv(name);
    saved_.push_back({name, old ? std::optional<std::string>(old) : std::nullopt});
    if (value)
      ::setenv(name, value->c_str(), 1);
    else
      ::unsetenv(name);
  }
  ~EnvGuard() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second)
        ::setenv(it->first.c_str(), it->second->c_str(), 1);
      else
        ::unsetenv(it->first.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

constexpr const char* kRankVars[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"};

TEST(ThreadPool, UsableCoresFollowsTheAffinityMask) {
  const int all = ThreadPool::usable_cores();
  ASSERT_GE(all, 1);
  EXPECT_LE(all, int(std::max(1u, std::thread::hardware_concurrency())));
  // A thread pinned to one CPU sees one usable core, whatever the machine has.
  int pinned = 0;
  std::thread t([&] {
    cpu_set_t cur;
    CPU_ZERO(&cur);
    ASSERT_EQ(sched_getaffinity(0, sizeof(cur), &cur), 0);
    int first = 0;
    while (!CPU_ISSET(first, &cur)) ++first;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(first, &one);
    ASSERT_EQ(pthread_setaffinity_np(pthread_self(), sizeof(one), &one), 0);
    pinned = ThreadPool::usable_cores();
  });
  t.join();
  EXPECT_EQ(pinned, 1);
}

TEST(ThreadPool, AtmoeThreadsIsClampedToUsableCores) {
  EnvGuard env;
  for (const char* v : kRankVars) env.set(v, std::nullopt);
  const int cores = ThreadPool::usable_cores();
  env.set("ATMOE_THREADS", "1000");
  EXPECT_EQ(ThreadPool::configured_threads(), cores);
  {
    ThreadPool pool(0);
    EXPECT_EQ(pool.size(), cores);
  }
  env.set("ATMOE_THREADS", std::to_string(cores + 1));
  EXPECT_EQ(ThreadPool::configured_threads(), cores);
  env.set("ATMOE_THREADS", std::to_string(cores));
  EXPECT_EQ(ThreadPool::configured_threads(), cores);
  env.set("ATMOE_THREADS", "1");
  EXPECT_EQ(ThreadPool::configured_threads(), 1);
  // 0 or unset: the default.
  env.set("ATMOE_THREADS", "0");
  EXPECT_EQ(ThreadPool::configured_threads(), ThreadPool::default_threads());
  env.set("ATMOE_THREADS", std::nullopt);
  EXPECT_EQ(ThreadPool::configured_threads(), ThreadPool::default_threads());
  EXPECT_EQ(ThreadPool::default_threads(), cores);  // no launcher variables set
  // An explicit size is taken as given (oversubscription on purpose).
  ThreadPool big(cores + 3);
  EXPECT_EQ(big.size(), cores + 3);
}

TEST(ThreadPool, DefaultThreadsDividesTheCoresAmongLocalRanks) {
  EnvGuard env;
  for (const char* v : kRankVars) env.set(v, std::nullopt);
  env.set("ATMOE_THREADS", std::nullopt);
  const int cores = ThreadPool::usable_cores();
  EXPECT_EQ(ThreadPool::local_ranks(), 1);
  EXPECT_EQ(ThreadPool::default_threads(), cores);
  for (const char* v : kRankVars) {  // each variable alone
    EnvGuard one;
    one.set(v, "2");
    EXPECT_EQ(ThreadPool::local_ranks(), 2) << v;
    EXPECT_EQ(ThreadPool::default_threads(), std::max(1, cores / 2)) << v;
    EXPECT_EQ(ThreadPool::configured_threads(), std::max(1, cores / 2)) << v;
  }
  // More ranks than cores: at least one thread each.
  env.set("MPI_LOCALNRANKS", "4096");
  EXPECT_EQ(ThreadPool::local_ranks(), 4096);
  EXPECT_EQ(ThreadPool::default_threads(), 1);
  // Precedence: Open MPI's variable, then MPI_LOCALNRANKS, then PMI_LOCAL_SIZE.
  env.set("PMI_LOCAL_SIZE", "3");
  EXPECT_EQ(ThreadPool::local_ranks(), 4096);
  env.set("OMPI_COMM_WORLD_LOCAL_SIZE", "5");
  EXPECT_EQ(ThreadPool::local_ranks(), 5);
  // A value that is not a positive integer is skipped.
  for (const char* bad : {"", "0", "-2", "abc", "3x", "99999999999999"}) {
    EnvGuard b;
    b.set("OMPI_COMM_WORLD_LOCAL_SIZE", bad);
    b.set("MPI_LOCALNRANKS", std::nullopt);
    EXPECT_EQ(ThreadPool::local_ranks(), 3) << "'" << bad << "'";
  }
  // ATMOE_THREADS wins over the division (still clamped).
  env.set("ATMOE_THREADS", "1");
  EXPECT_EQ(ThreadPool::configured_threads(), 1);
}

// Pool sizes: serial, the machine, odd, and far more threads than any test machine has cores.
std::vector<int> pool_sizes() {
  return {1, 2, 3, ThreadPool::usable_cores(), 64};
}

TEST(ThreadPool, ParallelForCoversEveryIndexOnce) {
  Watchdog wd(std::chrono::seconds(300));
  for (int nt : pool_sizes()) {
    ThreadPool pool(nt);
    for (int64_t n : {0, 1, 2, 7, 63, 64, 65, 1000, 100003})
      for (int64_t grain : {1, 3, 32, 1024}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::atomic<bool> bad_range{false};
        pool.parallel_for(
            n,
            [&](int64_t b, int64_t e) {
              if (!(0 <= b && b < e && e <= n && b % grain == 0 && (e % grain == 0 || e == n))) bad_range = true;
              for (int64_t i = b; i < e; ++i) hits[size_t(i)].fetch_add(1, std::memory_order_relaxed);
            },
            grain);
        EXPECT_FALSE(bad_range.load()) << "threads " << nt << " n " << n << " grain " << grain;
        int64_t wrong = 0;
        for (auto& h : hits) wrong += h.load() != 1;
        EXPECT_EQ(wrong, 0) << "threads " << nt << " n " << n << " grain " << grain;
      }
  }
}

TEST(ThreadPool, ProgressHookRunsOnTheCallerBetweenChunks) {
  // The coordinator's MPI progress: the hook runs only on the calling thread (the one
  // that owns MPI), at least once per parallel_for of several chunks, also on a one-thread
  // pool (which then splits the range), and the work is still done exactly once.
  Watchdog wd(std::chrono::seconds(300));
  for (int nt : pool_sizes()) {
    ThreadPool pool(nt);
    const std::thread::id caller = std::this_thread::get_id();
    int calls = 0;
    bool off_caller = false;
    pool.set_progress_hook([&] {
      off_caller |= std::this_thread::get_id() != caller;
      ++calls;  // a data race if it ever ran on a worker: off_caller fails the test first
    });
    const int64_t n = 1000;
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    pool.parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[size_t(i)].fetch_add(1, std::memory_order_relaxed);
    });
    EXPECT_FALSE(off_caller) << "threads " << nt;
    EXPECT_GE(calls, 1) << "threads " << nt;
    int64_t wrong = 0;
    for (auto& h : hits) wrong += h.load() != 1;
    EXPECT_EQ(wrong, 0) << "threads " << nt;
    pool.set_progress_hook(nullptr);
    calls = 0;
    pool.parallel_for(n, [&](int64_t, int64_t) {});
    EXPECT_EQ(calls, 0) << "threads " << nt << ": a cleared hook still ran";
  }
}

TEST(ThreadPool, ManyBackToBackRegionsOnMoreThreadsThanCores) {
  // The decode-step pattern: many small regions in a row, here on 64 threads, with enough
  // work per index (a few microseconds) that workers join while the caller still claims.
  Watchdog wd(std::chrono::seconds(300));
  ThreadPool pool(64);
  std::vector<std::atomic<int>> hits(96);
  std::atomic<uint64_t> sink{0};
  for (int rep = 0; rep < 2000; ++rep)
    pool.parallel_for(96, [&](int64_t b, int64_t e) {
      uint64_t x = uint64_t(b) + 1;
      for (int64_t i = b; i < e; ++i) {
        for (int k = 0; k < 500; ++k) x = x * 6364136223846793005ull + 1442695040888963407ull;
        hits[size_t(i)].fetch_add(1, std::memory_order_relaxed);
      }
      sink.fetch_add(x, std::memory_order_relaxed);
    });
  for (auto& h : hits) EXPECT_EQ(h.load(), 2000);
}

TEST(ThreadPool, RunCallsEveryThreadExactlyOnce) {
  Watchdog wd(std::chrono::seconds(300));
  for (int nt : pool_sizes()) {
    ThreadPool pool(nt);
    for (int rep = 0; rep < 200; ++rep) {
      std::vector<std::atomic<int>> calls(static_cast<size_t>(nt));
      std::atomic<bool> bad{false};
      pool.run([&](int tid, int n) {
        if (n != nt || tid < 0 || tid >= nt)
          bad = true;
        else
          calls[size_t(tid)].fetch_add(1);
      });
      ASSERT_FALSE(bad.load());
      for (int i = 0; i < nt; ++i) ASSERT_EQ(calls[size_t(i)].load(), 1) << "threads " << nt << " tid " << i;
    }
  }
}

TEST(ThreadPool, RunDynamicCompletesTheWorkWithUniqueThreadIndices) {
  Watchdog wd(std::chrono::seconds(300));
  for (int nt : pool_sizes()) {
    ThreadPool pool(nt);
    std::vector<std::atomic<int>> busy(static_cast<size_t>(nt));  // a tid in use twice at once fails
    for (int rep = 0; rep < 200; ++rep) {
      const int64_t items = 1 + rep % 37;
      std::vector<std::atomic<int>> done(static_cast<size_t>(items));
      std::atomic<int64_t> next{0};
      std::atomic<bool> bad{false};
      pool.run_dynamic([&](int tid, int n) {
        if (n != nt || tid < 0 || tid >= nt || busy[size_t(tid)].exchange(1)) {
          bad = true;
          return;
        }
        for (int64_t i; (i = next.fetch_add(1)) < items;) done[size_t(i)].fetch_add(1);
        busy[size_t(tid)].store(0);
      });
      ASSERT_FALSE(bad.load()) << "threads " << nt;
      for (auto& d : done) ASSERT_EQ(d.load(), 1) << "threads " << nt;
    }
  }
}

TEST(ThreadPool, BarrierSeparatesPhases) {
  // Each thread writes its slot, waits, then checks every slot of the phase: a thread
  // leaving the barrier early would see a stale value. Several barriers per run, as in
  // the LoRA kernel's shrink -> expand.
  Watchdog wd(std::chrono::seconds(300));
  for (int nt : pool_sizes()) {
    ThreadPool pool(nt);
    constexpr int kPhases = 4;
    std::vector<std::atomic<int>> slot(static_cast<size_t>(nt));
    for (int rep = 0; rep < (nt > 8 ? 50 : 500); ++rep) {
      std::atomic<int> arrived[kPhases] = {};
      std::atomic<int64_t> stale{0};
      pool.run([&](int tid, int n) {
        for (int ph = 0; ph < kPhases; ++ph) {
          const int v = rep * kPhases + ph + 1;
          slot[size_t(tid)].store(v, std::memory_order_relaxed);
          ThreadPool::barrier(arrived[ph], n);
          for (int j = 0; j < n; ++j) {
            const int s = slot[size_t(j)].load(std::memory_order_relaxed);
            if (s < v) stale.fetch_add(1);  // a later phase's value (> v) is fine
          }
        }
      });
      ASSERT_EQ(stale.load(), 0) << "threads " << nt << " rep " << rep;
    }
  }
}

TEST(ThreadPool, SideJobRunsOnceOnAWorkerBesideTheChunksOrComesBack) {
  // The in-process experts beside the base GEMM: a side job set before a parallel_for is run
  // once, by a worker (never the caller), before that worker's chunks, while the chunks are
  // still all done exactly once; take_side_job() then says it ran. A one-thread pool, a
  // range of one chunk and no region at all hand it back untaken. Each chunk spins until the
  // job is taken (bounded), so a worker that exists takes it on a busy machine too.
  Watchdog wd(std::chrono::seconds(300));
  for (int nt : pool_sizes()) {
    ThreadPool pool(nt);
    const std::thread::id caller = std::this_thread::get_id();
    for (int rep = 0; rep < 50; ++rep) {
      std::atomic<int> runs{0};
      std::atomic<bool> on_caller{false}, bad_tid{false}, after_a_chunk{false};
      std::atomic<int64_t> chunks_done{0};
      const std::function<void(int)> job = [&](int tid) {
        on_caller = on_caller || std::this_thread::get_id() == caller;
        bad_tid = bad_tid || tid <= 0 || tid >= nt;
        runs.fetch_add(1);
      };
      const int64_t taken0 = pool.side_jobs_taken();
      pool.set_side_job(&job);
      const int64_t n = 64;
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      pool.parallel_for(n, [&](int64_t b, int64_t e) {
        const auto t0 = std::chrono::steady_clock::now();
        while (nt > 1 && runs.load() == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
          std::this_thread::yield();
        if (std::this_thread::get_id() != caller && runs.load() == 0) after_a_chunk = true;
        for (int64_t i = b; i < e; ++i) hits[size_t(i)].fetch_add(1);
        chunks_done.fetch_add(1);
      });
      int64_t wrong = 0;
      for (auto& h : hits) wrong += h.load() != 1;
      ASSERT_EQ(wrong, 0) << "threads " << nt;
      const bool returned = pool.take_side_job(&job);
      ASSERT_FALSE(on_caller.load()) << "threads " << nt;
      ASSERT_FALSE(bad_tid.load()) << "threads " << nt;
      if (nt == 1) {
        ASSERT_TRUE(returned);  // one thread: no worker to run it beside the chunks
        ASSERT_EQ(runs.load(), 0);
      } else {
        ASSERT_FALSE(returned) << "threads " << nt << " rep " << rep;  // the chunks waited for a worker to take it
        ASSERT_EQ(runs.load(), 1) << "threads " << nt;
        ASSERT_EQ(pool.side_jobs_taken(), taken0 + 1);
      }
      ASSERT_FALSE(after_a_chunk.load()) << "a worker ran a chunk before the side job it took";
      ASSERT_FALSE(pool.take_side_job(&job));  // nothing pending any more
    }
    // One chunk (run inline) and no region at all: the job comes back untaken; offered once
    // and not taken, no later region runs it (its inputs may be gone by then).
    std::atomic<int> runs{0};
    const std::function<void(int)> job = [&](int) { runs.fetch_add(1); };
    pool.set_side_job(&job);
    pool.parallel_for(1, [](int64_t, int64_t) {});
    EXPECT_TRUE(pool.side_job_pending());
    pool.parallel_for(64, [&](int64_t, int64_t) {
      const auto t0 = std::chrono::steady_clock::now();
      while (runs.load() == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(20))
        std::this_thread::yield();
    });
    EXPECT_TRUE(pool.take_side_job(&job)) << "threads " << nt;
    EXPECT_FALSE(pool.side_job_pending());
    pool.set_side_job(&job);
    EXPECT_TRUE(pool.take_side_job(&job)) << "threads " << nt;
    EXPECT_EQ(runs.load(), 0);
  }
  // A side job that throws: the exception reaches the caller of the region that ran it.
  ThreadPool pool(2);
  const std::function<void(int)> boom = [](int) { throw std::runtime_error("side job"); };
  pool.set_side_job(&boom);
  EXPECT_THROW(pool.parallel_for(64,
                                 [&](int64_t, int64_t) {
                                   const auto t0 = std::chrono::steady_clock::now();
                                   while (pool.side_jobs_taken() == 0 &&
                                          std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
                                     std::this_thread::yield();
                                 }),
               std::runtime_error);
  EXPECT_FALSE(pool.take_side_job(&boom));
}

TEST(ThreadPool, ExceptionsReachTheCaller) {
  Watchdog wd(std::chrono::seconds(300));
  ThreadPool pool(4);
  EXPECT_THROW(pool.run([](int tid, int) {
    if (tid == 2) throw std::runtime_error("worker");
  }),
               std::runtime_error);
  EXPECT_THROW(pool.run([](int tid, int) {
    if (tid == 0) throw std::runtime_error("caller");
  }),
               std::runtime_error);
  EXPECT_THROW(pool.parallel_for(100,
                                 [](int64_t b, int64_t) {
                                   if (b == 0) throw std::runtime_error("chunk");
                                 }),
               std::runtime_error);
  // Still usable afterwards.
  std::atomic<int64_t> sum{0};
  pool.parallel_for(1000, [&](int64_t b, int64_t e) { sum += e - b; });
  EXPECT_EQ(sum.load(), 1000);
}

}  // namespace
}  // namespace atmoe::test
