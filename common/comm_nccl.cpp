#include "common/comm_nccl.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <sched.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "common/comm_mpi.h"
#include "common/wire.h"

// Every CUDA runtime / NCCL call: the expression, its error string, file and line.
#define ATMOE_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                  \
    const cudaError_t e_ = (expr);                                                                      \
    if (e_ != cudaSuccess)                                                                              \
      throw ::atmoe::CommError(                                                                         \
          fmt::format("{} failed: {} ({}:{})", #expr, cudaGetErrorString(e_), __FILE__, __LINE__), -1); \
  } while (0)
#define ATMOE_NCCL_CHECK(expr)                                                                          \
  do {                                                                                                  \
    const ncclResult_t r_ = (expr);                                                                     \
    if (r_ != ncclSuccess)                                                                              \
      throw ::atmoe::CommError(                                                                         \
          fmt::format("{} failed: {} ({}:{})", #expr, ncclGetErrorString(r_), __FILE__, __LINE__), -1); \
  } while (0)

namespace atmoe {

struct NcclComm::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  bool in_group = false;
  std::vector<int> pending_peers;  // peers of the open batch, for timeout messages
};

NcclComm::NcclComm(MpiSession& s) : impl_(std::make_unique<Impl>()), s_(s), rank_(s.rank()), size_(s.size()) {
  // The unique id: made on rank 0, sent to every other rank over MPI (ctrl communicator).
  ncclUniqueId id;
  std::vector<Communicator::Request> rq;
  if (rank_ == 0) {
    ATMOE_NCCL_CHECK(ncclGetUniqueId(&id));
    for (int r = 1; r < size_; ++r) rq.push_back(s.ctrl().isend(&id, sizeof id, r, kTagCtrl + 100));
  } else {
    rq.push_back(s.ctrl().irecv(&id, sizeof id, 0, kTagCtrl + 100));
  }
  s.ctrl().wait_all(rq, 600);
  ATMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->stream, cudaStreamNonBlocking));
  ATMOE_NCCL_CHECK(ncclCommInitRank(&impl_->comm, size_, id, rank_));
}

NcclComm::~NcclComm() {
  if (impl_->comm) ncclCommDestroy(impl_->comm);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

std::string NcclComm::describe(int peer) const {
  return s_.ctrl().describe(peer);
}

Communicator::Request NcclComm::isend(const void* buf, size_t bytes, int peer, int tag) {
  (void)tag;  // NCCL matches point-to-point operations by order, not tag
  if (!impl_->in_group) {
    ATMOE_NCCL_CHECK(ncclGroupStart());
    impl_->in_group = true;
  }
  ATMOE_NCCL_CHECK(ncclSend(buf, bytes, ncclChar, peer, impl_->comm, impl_->stream));
  impl_->pending_peers.push_back(peer);
  return int(impl_->pending_peers.size()) - 1;
}

Communicator::Request NcclComm::irecv(void* buf, size_t bytes, int peer, int tag) {
  (void)tag;
  if (!impl_->in_group) {
    ATMOE_NCCL_CHECK(ncclGroupStart());
    impl_->in_group = true;
  }
  ATMOE_NCCL_CHECK(ncclRecv(buf, bytes, ncclChar, peer, impl_->comm, impl_->stream));
  impl_->pending_peers.push_back(peer);
  return int(impl_->pending_peers.size()) - 1;
}

void NcclComm::wait_all(std::vector<Request>& reqs, double timeout_s) {
  reqs.clear();
  if (impl_->in_group) {
    impl_->in_group = false;
    ATMOE_NCCL_CHECK(ncclGroupEnd());
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    const cudaError_t q = cudaStreamQuery(impl_->stream);
    if (q == cudaSuccess) break;
    if (q != cudaErrorNotReady) ATMOE_CUDA_CHECK(q);
    ncclResult_t async = ncclSuccess;
    ATMOE_NCCL_CHECK(ncclCommGetAsyncError(impl_->comm, &async));
    ATMOE_NCCL_CHECK(async);
    if (timeout_s > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > timeout_s) {
      const int who = impl_->pending_peers.empty() ? -1 : impl_->pending_peers.front();
      ncclCommAbort(impl_->comm);
      impl_->comm = nullptr;
      throw PeerTimeout(fmt::format("NCCL transfers with {} did not finish within {:g} s", describe(who), timeout_s),
                        who);
    }
    sched_yield();
  }
  impl_->pending_peers.clear();
}

int NcclComm::recv(std::vector<uint8_t>& out, int peer, int tag, double timeout_s) {
  (void)out;
  (void)peer;
  (void)tag;
  (void)timeout_s;
  throw RuntimeError("NcclComm::recv: messages of unknown size travel over MPI (MpiComm)");
}

bool NcclComm::probe(int peer, int tag) {
  (void)peer;
  (void)tag;
  throw RuntimeError("NcclComm::probe: control messages travel over MPI (MpiComm)");
}

}  // namespace atmoe
