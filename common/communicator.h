// The data plane between ranks (DESIGN.md 3): point-to-point byte messages with deadlines.
// Backends: MPI (host buffers; every build; common/comm_mpi.h) and NCCL (device buffers;
// CUDA builds; the GPU issue). Expert dispatch sends each worker the activations and
// coefficient rows of the tokens that use its experts and receives the partial sums.
//
// Every wait has a deadline: a peer that does not answer in time ends the wait with a
// PeerTimeout naming it ("rank 2 (host node07)"); a transport error is a CommError. The
// caller decides what a failure means (the coordinator reports it and ends the job).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"

namespace atmoe {

class CommError : public Error {
 public:
  CommError(const std::string& msg, int peer) : Error(msg), peer_(peer) {}
  int peer() const { return peer_; }  // -1 when not one peer's fault

 private:
  int peer_;
};

class PeerTimeout : public CommError {
 public:
  using CommError::CommError;
};

class Communicator {
 public:
  using Request = int;  // index into the backend's table; valid until waited
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "rank N (host H)": for messages.
  virtual std::string describe(int peer) const = 0;
  // Non-blocking; the buffer must stay valid and unchanged until the request is waited.
  virtual Request isend(const void* buf, size_t bytes, int peer, int tag) = 0;
  virtual Request irecv(void* buf, size_t bytes, int peer, int tag) = 0;
  // Completes every request or throws PeerTimeout naming the first peer still pending
  // when timeout_s (> 0) has passed; requests are released either way.
  virtual void wait_all(std::vector<Request>& reqs, double timeout_s) = 0;
  // A message of any size from `peer` (-1: any peer) with `tag`, into `out`; returns the
  // source. timeout_s <= 0 waits forever. Throws PeerTimeout (peer -1 when any).
  virtual int recv(std::vector<uint8_t>& out, int peer, int tag, double timeout_s) = 0;
  // True when a message from `peer` (-1: any) with `tag` is waiting.
  virtual bool probe(int peer, int tag) = 0;
  // Advances these requests without waiting (Open MPI moves a rendezvous message only
  // inside MPI calls: the coordinator calls this between GEMM chunks). They stay valid for
  // wait_all, completed or not.
  virtual void progress(const std::vector<Request>& reqs) = 0;
};

}  // namespace atmoe
