// A fixed pool of compute threads. The calling thread takes part as thread 0.
//
// Size: ThreadPool(0) takes ATMOE_THREADS, clamped to the usable cores (this process's
// affinity mask: taskset and cpusets count, hardware_concurrency does not), or when 0 /
// unset default_threads(): usable cores ÷ MPI ranks on this node. ThreadPool(n > 0) takes
// n as given (tests oversubscribe on purpose).
//
// Waiting: every wait (an idle worker for the next job, the caller for the workers, a
// thread in barrier()) polls for at most ATMOE_SPIN_US (a short _mm_pause spin, then
// sched_yield so a thread sharing our core can run), then blocks on a futex. A decode step
// runs hundreds of small parallel regions back to back: the poll catches them without a
// wake-up each (ggml's threadpool does the same), and the bound keeps a thread whose peer
// was descheduled from burning the core that peer needs. A waiter whose peer last ran on
// its own CPU (one core lost to another process puts both of ours on the other) skips the
// spin and yields at once.
//
// Work sharing: parallel_for and run_dynamic hand out chunks from a shared counter, and
// the caller does not wait for a worker that had not joined by the time the work ran out.
// A thread that loses its core to another process then does less of the work instead of
// holding everyone: a busy core costs about its share, not the whole step.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace atmoe {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads = 0);  // 0: configured_threads()
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }

  // Runs fn(thread_index, n_threads) exactly once on every thread (the caller is thread 0)
  // and waits for all: for static per-thread work and kernels that use barrier(). An
  // exception from fn is rethrown here once every thread has finished (a thread that
  // throws before a barrier() leaves the others waiting there: don't).
  void run(const std::function<void(int, int)>& fn);
  // Runs fn(thread_index, n_threads) on the caller and on each worker that joins before
  // the caller's own call returns; returns once every thread that joined has finished.
  // fn must take its work from a shared counter so that any subset of threads (the caller
  // alone included) completes it; thread_index < size() is unique among the threads
  // running at once (per-thread scratch may be indexed by it). No barrier() inside.
  void run_dynamic(const std::function<void(int, int)>& fn);
  // Calls fn(b, e) on disjoint ranges that cover [0, n) exactly once, in any order and on
  // any thread: a few chunks per thread, each a multiple of `grain` (but the last),
  // claimed from a shared counter (run_dynamic).
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain = 1);
  // While set, the calling thread runs hook() after each chunk it takes in parallel_for (a
  // one-thread pool then runs the range in chunks too): the coordinator's MPI progress
  // while the base GEMM runs (coordinator/remote_experts.cpp). Set and cleared by the
  // pool's owner between parallel regions; empty: no hook.
  void set_progress_hook(std::function<void()> hook) { progress_ = std::move(hook); }

  // A side job: one call of job(thread_index), run by a worker beside the chunks of the
  // next parallel_for (the first worker to join takes it before its own chunks; the caller
  // never does). The in-process experts of a site input run beside the base GEMM of that
  // input this way: one core reads their rank rows while the others stream the GEMM's
  // weights, instead of all reading them after it (docs/performance.md). Only the next
  // parallel_for offers it: untaken there (no worker joined, a one-thread pool, a range of
  // one chunk), it waits for take_side_job() and no later region runs it. One job at a time
  // (side_job_pending() says whether the slot is taken); job must stay valid until
  // take_side_job(job). For the pool's owner thread only.
  void set_side_job(const std::function<void(int)>* job);
  // Withdraws job if no worker took it (true: the caller must run or drop it); false when a
  // worker took it, which has then finished (the region it ran in has returned).
  bool take_side_job(const std::function<void(int)>* job);
  bool side_job_pending() const;
  // Side jobs taken by a worker so far (tests).
  int64_t side_jobs_taken() const { return side_taken_.load(std::memory_order_relaxed); }

  static ThreadPool& global();

  // Inside run(): every thread waits here until all n have arrived (one use per counter,
  // which starts at 0; the counter is not meaningful to read afterwards).
  static void barrier(std::atomic<int>& arrived, int n);

  // CPU_COUNT of this thread's affinity mask (sched_getaffinity), at least 1.
  static int usable_cores();
  // Ranks on this node from the launcher's environment (OMPI_COMM_WORLD_LOCAL_SIZE, else
  // MPI_LOCALNRANKS, else PMI_LOCAL_SIZE), 1 when none is set or valid.
  static int local_ranks();
  // usable_cores() ÷ local_ranks(), at least 1.
  static int default_threads();
  // The size ThreadPool(0) takes: ATMOE_THREADS, clamped to usable_cores() with one
  // warning on the `kernel` logger; default_threads() when ATMOE_THREADS is 0 or unset.
  static int configured_threads();

 private:
  void worker(int idx);
  std::function<void()> progress_;
  // side_: a side job not yet offered; side_back_: offered by a parallel_for and not taken.
  // Both written by the owner only (a worker takes from the region's own slot).
  const std::function<void(int)>* side_ = nullptr;
  const std::function<void(int)>* side_back_ = nullptr;
  std::atomic<int64_t> side_taken_{0};
  void start(const std::function<void(int, int)>& fn);  // publish a job
  bool try_join(uint32_t gen);
  void wait_done(uint32_t target);
  void finish(std::exception_ptr own);  // rethrows the caller's or a worker's exception

  int n_;
  int64_t poll_ns_;  // ATMOE_SPIN_US: how long a wait polls before it blocks
  int64_t spin_ns_;  // the first part of it, spent in _mm_pause (0 when oversubscribed)
  std::vector<std::thread> threads_;
  const std::function<void(int, int)>* job_ = nullptr;
  // gen_: job generation; idle workers wait for it to change (futex word).
  alignas(64) std::atomic<uint32_t> gen_{0};
  std::atomic<int> sleepers_{0};  // workers blocked on gen_
  // seats_: (generation << 32) | closed bit (1 << 31) | workers that joined this job.
  // A worker joins by a CAS that fails once the generation moved on or the caller closed it.
  alignas(64) std::atomic<uint64_t> seats_{0};
  // done_: workers that finished the current job; the caller waits on it (futex word).
  alignas(64) std::atomic<uint32_t> done_{0};
  std::atomic<uint32_t> caller_blocked_{0};
  std::atomic<bool> stop_{false};
  // cpu_of_[0]: the caller's CPU at its last start() or wait; cpu_of_[i > 0]: the CPU worker
  // i runs the current job on, -1 outside a job. Written by that thread. A waiter that finds
  // a thread it waits for on its own CPU stops spinning and yields.
  std::unique_ptr<std::atomic<int>[]> cpu_of_;
  std::exception_ptr err_;  // the first exception a worker's fn threw in this job
};

}  // namespace atmoe
