// MPI: the process group (MpiSession) and the MPI backend of Communicator (host buffers).
//
// atmoe initialises MPI only when a launcher started it (mpirun/mpiexec, srun with PMI/
// PMIx): a plain `atmoe ...` is one process and never touches MPI. Only the main thread
// calls MPI (MPI_THREAD_FUNNELED). Errors on atmoe's communicators return codes
// (MPI_ERRORS_RETURN) that ATMOE_MPI_CHECK turns into CommError with the call, file and line.
//
// Communicators: `data` carries the per-layer expert traffic; `ctrl` (its own duplicate)
// carries session messages (hello, ready, stats, shutdown), so neither can match the other's.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "common/communicator.h"

namespace atmoe {

// True when a launcher started this process as one rank of several (or of one).
bool launched_by_mpi();

class MpiComm;

class MpiSession {
 public:
  // MPI_Init_thread once; later calls return the same session. Exits the process with a
  // clear line when MPI cannot start.
  static MpiSession& init(int* argc, char*** argv);
  static MpiSession* get();  // nullptr unless init() ran

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  const std::string& host() const { return host_; }
  MpiComm& data() { return *data_; }
  MpiComm& ctrl() { return *ctrl_; }
  // Host name of every rank (gathered at init).
  const std::vector<std::string>& hosts() const { return hosts_; }
  // Rank 0: the process ids of the worker ranks (from their Ready). When the launcher ends
  // the job with SIGTERM (mpirun does when a rank dies, before atmoe could notice), rank 0
  // first prints one line naming a worker on this host that is gone, if any.
  void watch_workers(const std::vector<std::pair<int, long>>& rank_pid);
  // MPI_Finalize (idempotent); MPI_Abort for ranks that cannot finish cleanly.
  void finalize();
  [[noreturn]] void abort(int code);

 private:
  MpiSession() = default;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  std::string host_;
  std::vector<std::string> hosts_;
  std::unique_ptr<MpiComm> data_, ctrl_;
  bool finalized_ = false;
};

class MpiComm : public Communicator {
 public:
  // Wraps a duplicate of `comm` (an MPI_Comm passed as its integer handle bits).
  MpiComm(void* comm_handle, const std::vector<std::string>* hosts);
  ~MpiComm() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string describe(int peer) const override;
  Request isend(const void* buf, size_t bytes, int peer, int tag) override;
  Request irecv(void* buf, size_t bytes, int peer, int tag) override;
  void wait_all(std::vector<Request>& reqs, double timeout_s) override;
  int recv(std::vector<uint8_t>& out, int peer, int tag, double timeout_s) override;
  bool probe(int peer, int tag) override;
  void progress(const std::vector<Request>& reqs) override;
  // Bytes sent and received through this communicator since it was made.
  int64_t bytes_sent() const { return bytes_sent_; }
  int64_t bytes_received() const { return bytes_recv_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
  const std::vector<std::string>* hosts_;
  int64_t bytes_sent_ = 0, bytes_recv_ = 0;
};

}  // namespace atmoe
