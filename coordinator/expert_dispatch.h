// The seam between the model and its experts (DESIGN.md 3). The model calls it per layer
// and per *site input* (attn_in -> q,k,v; attn_out -> o; mlp_in -> gate,up; mlp_act ->
// down) in two halves, so the base GEMM of that input overlaps the experts' work:
//
//   route(layer, h)            the layer's routing, from the router input h
//   post(layer, in, x)         before the base GEMM of `in`: hand over the activations
//   base GEMM                  y = W0 x
//   wait(layer, in, y)         after it: y += the experts' deltas of every site of `in`
//
// y is the input's fused output, the sites side by side: q|k|v, o, gate|up, down; x stays
// valid and unchanged between post and wait. The model knows neither the method (AT-MoE,
// T-REX) nor where the experts run (in-process, worker ranks).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common/peft_adapter.h"

namespace atmoe {

class Model;
struct ForwardItem;
struct RoutingControls;
struct SeqRouting;

// Time the model spent in the dispatch since the last reset (benchmarks: the per-step split).
struct DispatchTimes {
  double route_s = 0;  // routing (router GEMVs, coefficients)
  double post_s = 0;   // handing over activations (in-process: building the call, handed to
                       // a thread beside the base GEMM when decode-sized; remote: pack + send)
  double wait_s = 0;   // after the base GEMM: in-process, the experts' compute, or joining the
                       // computation beside the GEMM and adding its deltas; remote, the
                       // exposed wait for the workers' partial sums and adding them
  int64_t steps = 0;   // forwards
};

class ExpertDispatch {
 public:
  virtual ~ExpertDispatch() = default;
  // Routing state of one request; InputError for controls the bundle refuses.
  virtual std::unique_ptr<SeqRouting> new_routing(const RoutingControls& c) const = 0;
  // True when a sequence's first forward must hold its whole prompt (per_request routing,
  // intuitions from the prompt's hidden state).
  virtual bool needs_whole_prompt() const = 0;
  // Once per forward, before the first layer (T-REX: intuitions from a base layer's hidden state).
  virtual void begin_step(Model& m, const std::vector<ForwardItem>& items) {
    (void)m;
    (void)items;
  }
  // The routing of layer `layer` for the T token rows of the batch (items in order), from the
  // router input h [T, ldh] (the normalised attention input of the layer).
  virtual void route(int layer, const std::vector<ForwardItem>& items, const float* h, int64_t ldh, int64_t T) = 0;
  // Whether route() of this forward reads h (a device model copies it to the host for it,
  // a synchronising download per layer; when false it passes h = nullptr).
  virtual bool route_reads_rows(const std::vector<ForwardItem>& items) const {
    (void)items;
    return true;
  }
  virtual void post(int layer, SiteInput in, const float* x, int64_t ldx, int64_t T) = 0;
  virtual void wait(int layer, SiteInput in, float* y, int64_t ldy, int64_t T) = 0;
  // After the last layer of a forward.
  virtual void end_step() {}
  DispatchTimes& times() { return times_; }

 protected:
  DispatchTimes times_;
};

}  // namespace atmoe
