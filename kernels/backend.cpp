// Backend helpers shared by every backend (kernels/backend.h).
#include "kernels/backend.h"

namespace atmoe {

PreparedWeight prepare_weight(Backend& be, const float* w, int64_t N, int64_t K, DType dt) {
  PreparedWeight p;
  p.buf = Buffer(be, be.weight_bytes(N, K, dt));
  be.prepare_weight(w, N, K, dt, p.buf.get());
  p.dtype = dt;
  p.N = N;
  p.K = K;
  return p;
}

}  // namespace atmoe
