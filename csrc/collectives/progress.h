// Where a collective stands: what every wait of it is given instead of (deadline, what,
// status).
//
// A Progress carries the deadline all the collective's waits share, the live status a
// waiting thread reads when it times out (what the engine is stuck on, which peers it waits
// for), and a description of the operation and of the phase within it. The description is
// built only when a wait is slow or fails: a phase is a parent plus a label (and an index,
// e.g. a ring step), held as pointers, so entering a phase on the hot path costs a few
// stores and formats nothing.
//
//   Progress op(deadline, describe_operation, &status);      // "#12 allreduce 'w' (...)"
//   Progress step(op, "ring reduce-scatter step", 3);         // "...: ring reduce-scatter step 3"
//   transport.wait_all(requests, peers, is_recv, step);
//
// A phase refers to its parent, so it must not outlive it (phases live on the stack of the
// code that runs them).
#pragma once

#include <chrono>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace pbm {

using Clock = std::chrono::steady_clock;

// Names what is being waited for; called only when a wait is slow or fails.
using Describe = std::function<std::string()>;

// Live progress of the operation being executed, readable from a waiting thread so a
// timeout on the Python side can say what the engine is stuck on.
class ProgressStatus {
 public:
  void set(std::string phase, std::vector<int> waiting_for) {
    std::lock_guard<std::mutex> lock(mu_);
    phase_ = std::move(phase);
    waiting_for_ = std::move(waiting_for);
  }
  std::string phase() const {
    std::lock_guard<std::mutex> lock(mu_);
    return phase_;
  }
  std::vector<int> waiting_for() const {
    std::lock_guard<std::mutex> lock(mu_);
    return waiting_for_;
  }

 private:
  mutable std::mutex mu_;
  std::string phase_ = "queued";
  std::vector<int> waiting_for_;
};

class Progress {
 public:
  // The operation as a whole. `what` and `status` (may be null) must outlive it.
  Progress(Clock::time_point deadline, const Describe& what, ProgressStatus* status)
      : deadline_(deadline), status_(status), what_(&what) {}
  // A phase of `parent`, described as "<parent>: <label>" or "<parent>: <label> <index>"
  // (index >= 0). `label` must be a string that outlives the phase (a literal).
  Progress(const Progress& parent, const char* label, long index = -1)
      : deadline_(parent.deadline_), status_(parent.status_), parent_(&parent), label_(label),
        index_(index) {}

  Clock::time_point deadline() const { return deadline_; }
  bool expired(Clock::time_point now) const { return now >= deadline_; }

  std::string describe() const {
    if (!parent_) return (*what_)();
    std::string text = parent_->describe() + ": " + label_;
    if (index_ >= 0) text += " " + std::to_string(index_);
    return text;
  }

  // Publishes what this phase waits for (world ranks) to a thread waiting on the operation.
  void report(std::vector<int> waiting_for) const {
    if (status_) status_->set(describe(), std::move(waiting_for));
  }
  // The same, for a phase described by the caller (formatted only because it is called).
  void report(std::string phase, std::vector<int> waiting_for) const {
    if (status_) status_->set(std::move(phase), std::move(waiting_for));
  }

 private:
  Clock::time_point deadline_;
  ProgressStatus* status_ = nullptr;
  const Describe* what_ = nullptr;  // the operation (root only)
  const Progress* parent_ = nullptr;
  const char* label_ = "";
  long index_ = -1;
};

}  // namespace pbm
