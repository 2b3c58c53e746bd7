#include "kernels/thread_pool.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <utility>

#include "common/env.h"
#include "common/error.h"
#include "common/log.h"

namespace atmoe {
namespace {

// The pause-spin part of a wait (the rest of ATMOE_SPIN_US is spent in sched_yield). Long
// enough to catch the next parallel region of a decode step on an idle core, short enough
// that a thread sharing its core with the peer it waits for gives the core up quickly.
constexpr int64_t kSpinNs = 20'000;
// parallel_for: chunks per thread, so that a thread that loses its core holds back at most
// about 1/kChunksPerThread of its share while the others take the rest.
constexpr int64_t kChunksPerThread = 4;
constexpr uint64_t kClosed = uint64_t(1) << 31;  // seats_: the caller stopped admitting workers
constexpr uint64_t kSeatCount = kClosed - 1;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Blocks while the 32-bit word at `addr` equals `expected` (or until a wake; callers re-check).
template <class A>
void futex_wait(A* addr, uint32_t expected) {
  static_assert(sizeof(A) == sizeof(uint32_t) && A::is_always_lock_free);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
template <class A>
void futex_wake(A* addr, int n) {
  static_assert(sizeof(A) == sizeof(uint32_t) && A::is_always_lock_free);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, n, nullptr, nullptr, 0);
}

// Polls ready() for at most poll_ns: _mm_pause for the first spin_ns, then sched_yield.
// shares_core() (checked now and then) ends the spin early: the thread we wait for last ran
// on our CPU, so it cannot make progress while we spin. True once ready(); false when the
// time is up and the caller should block.
template <class Ready, class SharesCore>
bool poll(Ready&& ready, int64_t spin_ns, int64_t poll_ns, SharesCore&& shares_core) {
  if (ready()) return true;
  const int64_t t0 = now_ns();
  for (unsigned i = 1;; ++i) {
    _mm_pause();
    if (ready()) return true;
    if ((i & 63) == 0 && (now_ns() - t0 >= spin_ns || shares_core())) break;
  }
  while (now_ns() - t0 < poll_ns) {
    sched_yield();
    if (ready()) return true;
  }
  return false;
}

int64_t env_poll_ns() {
  return env_int("ATMOE_SPIN_US") * 1000;
}

int positive_env(const char* name) {
  const char* s = std::getenv(name);
  if (!s || !*s) return 0;
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  return *end == '\0' && errno == 0 && v >= 1 && v <= (1 << 20) ? int(v) : 0;
}

std::mutex g_err_mu;  // guards ThreadPool::err_ writes from workers

}  // namespace

int ThreadPool::usable_cores() {
  for (int ncpu = 1024; ncpu <= (1 << 18); ncpu *= 2) {
    cpu_set_t* set = CPU_ALLOC(ncpu);
    if (!set) break;
    const size_t bytes = CPU_ALLOC_SIZE(ncpu);
    CPU_ZERO_S(bytes, set);
    const int rc = sched_getaffinity(0, bytes, set), err = errno;
    const int n = rc == 0 ? CPU_COUNT_S(bytes, set) : 0;
    CPU_FREE(set);
    if (rc == 0) return std::max(1, n);
    if (err != EINVAL) break;  // EINVAL: the kernel's mask is larger than ncpu bits
  }
  return int(std::max(1u, std::thread::hardware_concurrency()));
}

int ThreadPool::local_ranks() {
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"})
    if (int n = positive_env(v)) return n;
  return 1;
}

int ThreadPool::default_threads() {
  return std::max(1, usable_cores() / local_ranks());
}

int ThreadPool::configured_threads() {
  const int64_t want = env_int("ATMOE_THREADS");
  if (want <= 0) return default_threads();
  const int cores = usable_cores();
  if (want <= cores) return int(want);
  static std::once_flag warned;
  std::call_once(warned, [&] {
    ATMOE_LOG("kernel")->warn("ATMOE_THREADS={} is more than the {} usable cores (affinity mask); using {}", want,
                              cores, cores);
  });
  return cores;
}

ThreadPool::ThreadPool(int n_threads) {
  n_ = n_threads > 0 ? n_threads : configured_threads();
  poll_ns_ = env_poll_ns();
  // Oversubscribed (more threads than cores): a spinning thread would only delay the one
  // it waits for, so go straight to sched_yield.
  spin_ns_ = n_ > usable_cores() ? 0 : std::min(poll_ns_, kSpinNs);
  cpu_of_ = std::make_unique<std::atomic<int>[]>(size_t(n_));
  for (int i = 0; i < n_; ++i) cpu_of_[size_t(i)].store(-1, std::memory_order_relaxed);
  for (int i = 1; i < n_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_release);
  gen_.fetch_add(1);
  futex_wake(&gen_, INT_MAX);
  for (auto& t : threads_) t.join();
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool(0);
  return pool;
}

// Job protocol. The caller: job_, done_ = 0, seats_ = (g << 32), then gen_ = g (seq_cst),
// and a futex wake when a worker sleeps. A worker that sees g takes a seat (try_join),
// runs the job and counts itself in done_. run() waits for done_ == n - 1 (every worker
// joins: nothing closes the seats). run_dynamic() closes the seats once its own share is
// done (no work is left to claim) and waits only for the workers that had joined.
// Sleep/wake pairs are Dekker-style on seq_cst operations: the sleeper announces itself
// (sleepers_ / caller_blocked_ / the barrier's flag bit), then re-reads the word; the
// waker changes the word, then reads the announcement.
void ThreadPool::worker(int idx) {
  uint32_t seen = 0;
  for (;;) {
    uint32_t g = seen;
    const auto new_job = [&] { return (g = gen_.load(std::memory_order_acquire)) != seen; };
    const auto beside_caller = [&] { return cpu_of_[0].load(std::memory_order_relaxed) == sched_getcpu(); };
    if (!poll(new_job, spin_ns_, poll_ns_, beside_caller)) {
      for (;;) {
        sleepers_.fetch_add(1);
        if (gen_.load() == seen) futex_wait(&gen_, seen);
        sleepers_.fetch_sub(1);
        if ((g = gen_.load(std::memory_order_acquire)) != seen) break;
      }
    }
    seen = g;
    if (stop_.load(std::memory_order_acquire)) return;
    if (!try_join(g)) continue;
    cpu_of_[size_t(idx)].store(sched_getcpu(), std::memory_order_relaxed);
    try {
      (*job_)(idx, n_);
    } catch (...) {
      std::lock_guard<std::mutex> lk(g_err_mu);
      if (!err_) err_ = std::current_exception();
    }
    cpu_of_[size_t(idx)].store(-1, std::memory_order_relaxed);
    done_.fetch_add(1);
    if (caller_blocked_.load()) futex_wake(&done_, 1);
  }
}

bool ThreadPool::try_join(uint32_t gen) {
  uint64_t s = seats_.load(std::memory_order_acquire);
  for (;;) {
    if (uint32_t(s >> 32) != gen || (s & kClosed)) return false;
    if (seats_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
  }
}

void ThreadPool::start(const std::function<void(int, int)>& fn) {
  job_ = &fn;
  err_ = nullptr;
  cpu_of_[0].store(sched_getcpu(), std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  const uint32_t g = gen_.load(std::memory_order_relaxed) + 1;
  seats_.store(uint64_t(g) << 32, std::memory_order_relaxed);
  gen_.store(g);  // seq_cst: publishes the stores above to a worker that reads g
  if (sleepers_.load() > 0) futex_wake(&gen_, INT_MAX);
}

void ThreadPool::wait_done(uint32_t target) {
  const int me = sched_getcpu();
  cpu_of_[0].store(me, std::memory_order_relaxed);
  const auto all_done = [&] { return done_.load(std::memory_order_acquire) == target; };
  const auto beside_a_worker = [&] {
    for (int i = 1; i < n_; ++i)
      if (cpu_of_[size_t(i)].load(std::memory_order_relaxed) == me) return true;
    return false;
  };
  if (poll(all_done, spin_ns_, poll_ns_, beside_a_worker)) return;
  caller_blocked_.store(1);
  for (uint32_t d; (d = done_.load()) != target;) futex_wait(&done_, d);
  caller_blocked_.store(0, std::memory_order_relaxed);
}

void ThreadPool::finish(std::exception_ptr own) {
  if (own) std::rethrow_exception(own);
  if (err_) std::rethrow_exception(std::exchange(err_, nullptr));
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  if (n_ == 1) {
    fn(0, 1);
    return;
  }
  start(fn);
  std::exception_ptr own;
  try {
    fn(0, n_);
  } catch (...) {
    own = std::current_exception();
  }
  wait_done(uint32_t(n_ - 1));
  finish(own);
}

void ThreadPool::run_dynamic(const std::function<void(int, int)>& fn) {
  if (n_ == 1) {
    fn(0, 1);
    return;
  }
  start(fn);
  std::exception_ptr own;
  try {
    fn(0, n_);
  } catch (...) {
    own = std::current_exception();
  }
  const uint64_t s = seats_.fetch_or(kClosed, std::memory_order_acq_rel);
  wait_done(uint32_t(s & kSeatCount));
  finish(own);
}

void ThreadPool::set_side_job(const std::function<void(int)>* job) {
  ATMOE_ASSERT(job != nullptr && !side_job_pending());
  side_ = job;
}

bool ThreadPool::take_side_job(const std::function<void(int)>* job) {
  for (const std::function<void(int)>** slot : {&side_, &side_back_})
    if (*slot == job) {
      *slot = nullptr;
      return true;
    }
  return false;
}

bool ThreadPool::side_job_pending() const {
  return side_ != nullptr || side_back_ != nullptr;
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain) {
  // The side job is offered to this region only (thread_pool.h); untaken, it goes back.
  const std::function<void(int)>* side = std::exchange(side_, nullptr);
  if (side) side_back_ = side;
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t units = (n + grain - 1) / grain;
  if (units == 1 || (n_ == 1 && !progress_)) {
    fn(0, n);
    return;
  }
  if (n_ == 1) {  // alone, with a progress hook: in chunks, the hook between them
    const int64_t chunk = std::max<int64_t>(1, units / (2 * kChunksPerThread)) * grain;
    for (int64_t b = 0; b < n; b += chunk) {
      fn(b, std::min(n, b + chunk));
      progress_();
    }
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, units / (int64_t(n_) * kChunksPerThread)) * grain;
  const int64_t chunks = (n + chunk - 1) / chunk;
  alignas(64) std::atomic<int64_t> next{0};
  const auto claim = [&](int tid) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      fn(c * chunk, std::min(n, (c + 1) * chunk));
      if (tid == 0 && progress_) progress_();  // the caller: the thread that owns MPI
    }
  };
  if (!side) {
    run_dynamic([&](int tid, int) { claim(tid); });
  } else {
    // A worker takes the side job before its chunks; the caller never does.
    std::atomic<const std::function<void(int)>*> offer{side};
    struct Back {  // taken (and so finished, also when something threw): nothing goes back
      ThreadPool* pool;
      std::atomic<const std::function<void(int)>*>& offer;
      ~Back() {
        if (!offer.load(std::memory_order_relaxed)) pool->side_back_ = nullptr;
      }
    } back{this, offer};
    run_dynamic([&](int tid, int) {
      if (tid != 0)
        if (const auto* job = offer.exchange(nullptr, std::memory_order_acq_rel)) {
          side_taken_.fetch_add(1, std::memory_order_relaxed);
          (*job)(tid);
        }
      claim(tid);
    });
  }
  if (progress_) progress_();  // also when the workers took every chunk
}

void ThreadPool::barrier(std::atomic<int>& arrived, int n) {
  constexpr int kSleeping = 1 << 30, kCount = kSleeping - 1;  // flag: a thread blocks on the futex
  const int v = arrived.fetch_add(1, std::memory_order_acq_rel) + 1;
  if ((v & kCount) >= n) {
    if (v & kSleeping) futex_wake(&arrived, INT_MAX);
    return;
  }
  static const int64_t poll_ns = env_poll_ns(), spin_ns = std::min(poll_ns, kSpinNs);
  const auto all_arrived = [&] { return (arrived.load(std::memory_order_acquire) & kCount) >= n; };
  if (poll(all_arrived, spin_ns, poll_ns, [] { return false; })) return;
  for (;;) {
    const int s = arrived.fetch_or(kSleeping, std::memory_order_acq_rel) | kSleeping;
    if ((s & kCount) >= n) return;
    futex_wait(&arrived, uint32_t(s));
  }
}

}  // namespace atmoe
