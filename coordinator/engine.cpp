#include "coordinator/engine.h"

#include "common/error.h"
#include "coordinator/scheduler.h"

namespace atmoe {

std::vector<GenerateResult> Engine::run(const std::vector<GenerateRequest>& reqs,
                                        const std::function<void(size_t, const std::string&)>& on_text) {
  SchedulerOptions so;
  so.max_batch_tokens = o_.max_batch_tokens;
  so.max_running = o_.max_running;
  so.kv_budget_bytes = o_.kv_budget_bytes;
  so.max_queue = reqs.size() + 1;
  Scheduler s(m_, so);
  std::vector<GenerateResult> out(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    RequestEvents ev;
    if (on_text) ev.on_text = [&on_text, i](const std::string& d) { on_text(i, d); };
    ev.on_finish = [&out, i](const GenerateResult& r) { out[i] = r; };
    try {
      s.submit(reqs[i], std::move(ev));
    } catch (const InputError& e) {
      throw InputError(fmt::format("request {}: {}", i, e.what()));
    }
  }
  while (s.step()) {
  }
  return out;
}

}  // namespace atmoe
