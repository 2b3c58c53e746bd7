// A fixed pool of compute threads (ATMOE_THREADS, default all cores). The calling thread
// takes part as thread 0. Workers spin for ATMOE_SPIN_US after each job before they
// sleep, so the hundreds of small parallel regions of a decode step do not pay a wake-up
// each (ggml's threadpool does the same).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace atmoe {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads = 0);  // 0: ATMOE_THREADS or hardware_concurrency
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }
  // Runs fn(thread_index, n_threads) on every thread and waits for all.
  void run(const std::function<void(int, int)>& fn);
  // Splits [0, n) into contiguous chunks, one per thread (rounded to `grain`).
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain = 1);

  static ThreadPool& global();

  // Inside run(): every thread waits here until all n have arrived (single use per counter).
  static void barrier(std::atomic<int>& arrived, int n);

 private:
  void worker(int idx);
  int n_;
  int64_t spin_ns_;
  std::vector<std::thread> threads_;
  const std::function<void(int, int)>* job_ = nullptr;
  alignas(64) std::atomic<uint64_t> gen_{0};
  alignas(64) std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
};

}  // namespace atmoe
