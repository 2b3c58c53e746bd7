// The NCCL backend of Communicator (CUDA builds): device buffers between GPU ranks, the
// data plane of the GPU path (DESIGN.md 3). Its unique id travels from rank 0 over the
// job's MPI control communicator; control messages stay on MPI.
//
// Buffers passed to isend/irecv are device pointers. Operations are enqueued on the
// backend's stream inside one NCCL group per batch (begin_batch .. wait_all), so a rank
// can post sends and receives to several peers without ordering deadlocks; wait_all polls
// the batch's completion event against its deadline. recv() of an unknown size and
// probe() have no NCCL equivalent: control traffic uses MpiComm.
//
// Compiled in CUDA builds only (ATMOE_HAVE_NCCL); not yet run on a GPU (the GPU issue).
#pragma once
#include <memory>

#include "common/communicator.h"

namespace atmoe {

class MpiSession;

class NcclComm : public Communicator {
 public:
  // Collective over the MPI job: every rank calls it with its CUDA device already set.
  explicit NcclComm(MpiSession& s);
  ~NcclComm() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string describe(int peer) const override;
  Request isend(const void* buf, size_t bytes, int peer, int tag) override;
  Request irecv(void* buf, size_t bytes, int peer, int tag) override;
  void wait_all(std::vector<Request>& reqs, double timeout_s) override;
  int recv(std::vector<uint8_t>& out, int peer, int tag, double timeout_s) override;
  bool probe(int peer, int tag) override;
  void progress(const std::vector<Request>&) override {}  // NCCL progresses on its stream

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  MpiSession& s_;
  int rank_ = 0, size_ = 1;
};

}  // namespace atmoe
