#include "common/comm_mpi.h"
#include "common/clock.h"

// The C API only (Open MPI and MPICH otherwise pull in their deprecated C++ bindings).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <fcntl.h>
#include <mpi.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "common/log.h"

// Every MPI call on atmoe's communicators: the call, its error string, file and line.
#define ATMOE_MPI_CHECK(expr)                                                                                 \
  do {                                                                                                        \
    const int rc_ = (expr);                                                                                   \
    if (rc_ != MPI_SUCCESS) {                                                                                 \
      char es_[MPI_MAX_ERROR_STRING];                                                                         \
      int n_ = 0;                                                                                             \
      MPI_Error_string(rc_, es_, &n_);                                                                        \
      throw ::atmoe::CommError(                                                                               \
          fmt::format("{} failed: {} ({}:{})", #expr, std::string(es_, size_t(n_)), __FILE__, __LINE__), -1); \
    }                                                                                                         \
  } while (0)

namespace atmoe {

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

namespace {
MpiSession* g_session = nullptr;

// Polling pace of a wait: spin for the first 100 µs (a round trip over shared memory takes
// a few µs), then yield the core each poll, and after 20 ms sleep 50 µs between polls so
// an idle rank costs nothing while it waits for a slow peer.
struct Pace {
  double t0 = now_s();
  void step() {
    const double dt = now_s() - t0;
    if (dt < 100e-6) return;
    if (dt < 20e-3) {
      sched_yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  bool expired(double timeout_s) const { return timeout_s > 0 && now_s() - t0 > timeout_s; }
};
}  // namespace

struct MpiComm::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  std::vector<MPI_Request> reqs;
  std::vector<int> peer;
  std::vector<int> free_slots;
  int slot(MPI_Request r, int p) {
    int i;
    if (!free_slots.empty()) {
      i = free_slots.back();
      free_slots.pop_back();
      reqs[size_t(i)] = r;
      peer[size_t(i)] = p;
    } else {
      i = int(reqs.size());
      reqs.push_back(r);
      peer.push_back(p);
    }
    return i;
  }
};

MpiComm::MpiComm(void* comm_handle, const std::vector<std::string>* hosts)
    : impl_(std::make_unique<Impl>()), hosts_(hosts) {
  ATMOE_MPI_CHECK(MPI_Comm_dup(*static_cast<MPI_Comm*>(comm_handle), &impl_->comm));
  ATMOE_MPI_CHECK(MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN));
  ATMOE_MPI_CHECK(MPI_Comm_rank(impl_->comm, &rank_));
  ATMOE_MPI_CHECK(MPI_Comm_size(impl_->comm, &size_));
}

MpiComm::~MpiComm() = default;  // communicators go with MPI_Finalize

std::string MpiComm::describe(int peer) const {
  if (peer < 0) return "a worker rank";
  if (hosts_ && size_t(peer) < hosts_->size()) return fmt::format("rank {} (host {})", peer, (*hosts_)[size_t(peer)]);
  return fmt::format("rank {}", peer);
}

Communicator::Request MpiComm::isend(const void* buf, size_t bytes, int peer, int tag) {
  ATMOE_ASSERT(bytes <= size_t(INT32_MAX));
  MPI_Request r;
  ATMOE_MPI_CHECK(MPI_Isend(buf, int(bytes), MPI_BYTE, peer, tag, impl_->comm, &r));
  bytes_sent_ += int64_t(bytes);
  return impl_->slot(r, peer);
}

Communicator::Request MpiComm::irecv(void* buf, size_t bytes, int peer, int tag) {
  ATMOE_ASSERT(bytes <= size_t(INT32_MAX));
  MPI_Request r;
  ATMOE_MPI_CHECK(MPI_Irecv(buf, int(bytes), MPI_BYTE, peer < 0 ? MPI_ANY_SOURCE : peer, tag, impl_->comm, &r));
  bytes_recv_ += int64_t(bytes);
  return impl_->slot(r, peer);
}

void MpiComm::wait_all(std::vector<Request>& reqs, double timeout_s) {
  if (reqs.empty()) return;
  Pace pace;
  std::vector<MPI_Request> rs(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) rs[i] = impl_->reqs[size_t(reqs[i])];
  auto release = [&] {
    for (Request r : reqs) impl_->free_slots.push_back(r);
    reqs.clear();
  };
  for (;;) {
    int done = 0;
    const int rc = MPI_Testall(int(rs.size()), rs.data(), &done, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) {
      release();
      ATMOE_MPI_CHECK(rc);
    }
    if (done) break;
    if (pace.expired(timeout_s)) {
      // Testall is all-or-nothing: find the peer whose request is still pending one by one.
      int who = -1;
      for (size_t i = 0; i < rs.size() && who < 0; ++i) {
        int flag = 0;
        if (rs[i] != MPI_REQUEST_NULL && MPI_Test(&rs[i], &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && !flag)
          who = impl_->peer[size_t(reqs[i])];
      }
      release();
      throw PeerTimeout(fmt::format("{} did not answer within {:g} s", describe(who), timeout_s), who);
    }
    pace.step();
  }
  release();
}

int MpiComm::recv(std::vector<uint8_t>& out, int peer, int tag, double timeout_s) {
  Pace pace;
  for (;;) {
    int flag = 0;
    MPI_Message msg;
    MPI_Status st;
    ATMOE_MPI_CHECK(MPI_Improbe(peer < 0 ? MPI_ANY_SOURCE : peer, tag, impl_->comm, &flag, &msg, &st));
    if (flag) {
      int n = 0;
      ATMOE_MPI_CHECK(MPI_Get_count(&st, MPI_BYTE, &n));
      out.resize(size_t(n));
      ATMOE_MPI_CHECK(MPI_Mrecv(out.data(), n, MPI_BYTE, &msg, MPI_STATUS_IGNORE));
      bytes_recv_ += n;
      return st.MPI_SOURCE;
    }
    if (pace.expired(timeout_s))
      throw PeerTimeout(fmt::format("{} did not answer within {:g} s", describe(peer), timeout_s), peer);
    pace.step();
  }
}

bool MpiComm::probe(int peer, int tag) {
  int flag = 0;
  ATMOE_MPI_CHECK(MPI_Iprobe(peer < 0 ? MPI_ANY_SOURCE : peer, tag, impl_->comm, &flag, MPI_STATUS_IGNORE));
  return flag != 0;
}

void MpiComm::progress(const std::vector<Request>& reqs) {
  // In place: a completed request becomes MPI_REQUEST_NULL in the table, which wait_all
  // counts as done. One pending request tested is one pass of the progress engine.
  for (Request r : reqs) {
    MPI_Request& q = impl_->reqs[size_t(r)];
    if (q == MPI_REQUEST_NULL) continue;
    int flag = 0;
    ATMOE_MPI_CHECK(MPI_Test(&q, &flag, MPI_STATUS_IGNORE));
    if (!flag) return;
  }
}

MpiSession& MpiSession::init(int* argc, char*** argv) {
  if (g_session) return *g_session;
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    std::fprintf(stderr, "atmoe: error: MPI_Init_thread failed: the MPI launcher's environment is broken\n");
    std::exit(1);
  }
  if (provided < MPI_THREAD_FUNNELED) {
    std::fprintf(stderr, "atmoe: error: this MPI library gives thread level %d; atmoe needs MPI_THREAD_FUNNELED\n",
                 provided);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  auto* s = new MpiSession();
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &s->rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &s->size_);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &s->local_rank_);
  MPI_Comm_size(local, &s->local_size_);
  MPI_Comm_free(&local);
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  MPI_Get_processor_name(name, &len);
  s->host_.assign(name, size_t(len));
  std::vector<char> all(size_t(s->size_) * MPI_MAX_PROCESSOR_NAME, 0);
  MPI_Allgather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, MPI_COMM_WORLD);
  for (int r = 0; r < s->size_; ++r) s->hosts_.emplace_back(all.data() + size_t(r) * MPI_MAX_PROCESSOR_NAME);
  MPI_Comm world = MPI_COMM_WORLD;
  s->data_ = std::make_unique<MpiComm>(&world, &s->hosts_);
  s->ctrl_ = std::make_unique<MpiComm>(&world, &s->hosts_);
  g_session = s;
  return *s;
}

MpiSession* MpiSession::get() {
  return g_session;
}

namespace {
// What the SIGTERM handler needs, prepared outside it (it may only call async-signal-safe
// functions: open, read, write, close, raise).
struct WatchedPeer {
  int rank;
  long pid;
  char stat_path[48];
  char line[256];  // "atmoe: error: worker rank R (host H, pid P) is gone; ...\n"
  int line_len;
};
WatchedPeer g_watched[1024];
volatile sig_atomic_t g_n_watched = 0;  // entries [0, n) are complete; published last

bool proc_gone(const char* stat_path) {
  const int fd = ::open(stat_path, O_RDONLY);
  if (fd < 0) return true;
  char buf[512];
  const ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return true;
  // "pid (comm) S ...": the state follows the last ')'.
  ssize_t i = n - 1;
  while (i > 0 && buf[i] != ')') --i;
  const char st = i + 2 < n ? buf[i + 2] : '?';
  return st == 'Z' || st == 'X';
}

void on_sigterm(int sig) {
  bool named = false;
  for (int i = 0; i < g_n_watched && !named; ++i)
    if (proc_gone(g_watched[i].stat_path)) {
      (void)!::write(2, g_watched[i].line, size_t(g_watched[i].line_len));
      named = true;
    }
  if (!named) {
    static const char msg[] =
        "atmoe: error: rank 0 was told to stop (SIGTERM) by the launcher: Ctrl-C, scancel, or a rank that ended\n";
    (void)!::write(2, msg, sizeof msg - 1);
  }
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}
}  // namespace

void MpiSession::watch_workers(const std::vector<std::pair<int, long>>& rank_pid) {
  g_n_watched = 0;  // the handler sees no entry while they are rewritten
  int n = 0;
  for (const auto& [r, pid] : rank_pid) {
    if (size_t(r) >= hosts_.size() || hosts_[size_t(r)] != host_ || pid <= 0 || n >= 1024) continue;
    WatchedPeer& w = g_watched[n++];
    w.rank = r;
    w.pid = pid;
    std::snprintf(w.stat_path, sizeof w.stat_path, "/proc/%ld/stat", pid);
    w.line_len =
        std::snprintf(w.line, sizeof w.line,
                      "atmoe: error: worker rank %d (host %.64s, pid %ld) is gone; the launcher is ending the job\n", r,
                      host_.c_str(), pid);
    if (w.line_len < 0 || w.line_len >= int(sizeof w.line)) w.line_len = int(sizeof w.line) - 1;
  }
  g_n_watched = n;
  struct sigaction sa {};
  sa.sa_handler = on_sigterm;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
}

void MpiSession::finalize() {
  if (finalized_) return;
  finalized_ = true;
  MPI_Finalize();
}

void MpiSession::abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace atmoe
