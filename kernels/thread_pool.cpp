#include "kernels/thread_pool.h"

#include <immintrin.h>

#include <chrono>

#include "common/env.h"

namespace atmoe {

static int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = int(env_int("ATMOE_THREADS"));
  if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  n_ = n_threads;
  spin_ns_ = env_int("ATMOE_SPIN_US") * 1000;
  for (int i = 1; i < n_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    gen_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool(0);
  return pool;
}

void ThreadPool::worker(int idx) {
  uint64_t seen = 0;
  for (;;) {
    int64_t t0 = now_ns();
    uint64_t g;
    unsigned spins = 0;
    while ((g = gen_.load(std::memory_order_acquire)) == seen) {
      _mm_pause();
      if ((++spins & 255) == 0 && now_ns() - t0 > spin_ns_) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1);
      }
    }
    seen = g;
    if (stop_.load()) return;
    (*job_)(idx, n_);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  if (n_ == 1) {
    fn(0, 1);
    return;
  }
  job_ = &fn;
  pending_.store(n_ - 1, std::memory_order_release);
  {
    // Publish under the lock so a worker about to sleep cannot miss the new generation.
    std::lock_guard<std::mutex> lk(mu_);
    gen_.fetch_add(1, std::memory_order_acq_rel);
  }
  if (sleepers_.load() > 0) cv_.notify_all();
  fn(0, n_);
  while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
}

void ThreadPool::barrier(std::atomic<int>& arrived, int n) {
  arrived.fetch_add(1, std::memory_order_acq_rel);
  while (arrived.load(std::memory_order_acquire) < n) _mm_pause();
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  int64_t chunks = (n + grain - 1) / grain;
  if (n_ == 1 || chunks == 1) {
    fn(0, n);
    return;
  }
  run([&](int i, int nt) {
    int64_t per = (chunks + nt - 1) / nt;
    int64_t b = std::min(n, int64_t(i) * per * grain), e = std::min(n, int64_t(i + 1) * per * grain);
    if (b < e) fn(b, e);
  });
}

}  // namespace atmoe
