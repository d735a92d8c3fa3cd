#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "../kernels/reduce.h"
#include "mpi_allreduce.h"
#include "small_allreduce.h"

namespace pbm {

namespace {
CollectiveHeader header_for(const CollectiveSpec& spec, uint64_t seq, uint64_t unnamed) {
  const AllreduceArgs& args = spec.args;
  CollectiveHeader header;
  header.seq = seq;
  header.unnamed = args.name.empty() ? unnamed : 0;
  header.name_hash = args.name.empty() ? unnamed_hash(unnamed) : name_hash(args.name);
  header.kind = static_cast<int32_t>(spec.kind);
  header.algorithm = static_cast<int32_t>(args.algorithm);
  header.op = static_cast<int32_t>(args.op);
  header.dtype = static_cast<int32_t>(args.dtype);
  header.count = args.count;
  header.root = spec.root;
  header.sparsity = args.wire.threelc() ? args.wire.sparsity : 0.f;
  header.signature = args.signature;
  header.threelc_block = args.wire.threelc() ? args.wire.block : 0;
  std::strncpy(header.name, args.name.c_str(), sizeof(header.name) - 1);
  return header;
}
}  // namespace

Operation::Operation(CollectiveSpec spec, uint64_t seq, uint64_t unnamed, Clock::time_point expires_at)
    : spec_(std::move(spec)), seq_(seq), expires_at_(expires_at), header_(header_for(spec_, seq, unnamed)) {}

std::string Operation::describe() const { return describe_header(header_); }

bool Operation::wait(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout_s < 0) {
    finished_cv_.wait(lock, [&] { return finished_; });
    return true;
  }
  return finished_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s),
                               [&] { return finished_; });
}

bool Operation::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_;
}

void Operation::rethrow_if_failed() const {
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(mu_);
    error = error_;
  }
  if (error) std::rethrow_exception(error);
}

void Operation::finish(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;  // the first outcome stands (a shutdown racing a failed round)
    finished_ = true;
    error_ = error;
  }
  finished_cv_.notify_all();
}

Engine::Engine(MPI_Comm comm, double timeout_s, bool progress_thread)
    : transport_(comm), handshake_(transport_), negotiator_(transport_), algorithms_(transport_, handshake_), timeout_s_(timeout_s) {
  if (progress_thread) progress_thread_ = std::thread([this] { progress_loop(); });
}

Engine::~Engine() { shutdown(); }

Clock::time_point Engine::deadline_after(double timeout_s) const {
  if (!(timeout_s > 0) || !std::isfinite(timeout_s)) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(timeout_s));
}

void Engine::validate(const CollectiveSpec& spec) const {
  // Argument errors are raised before a sequence number is taken, so a rejected call
  // leaves the ranks in step.
  const AllreduceArgs& args = spec.args;
  const std::string where = "rank " + std::to_string(rank()) + ": " + collective_kind_name(spec.kind) +
                            (args.name.empty() ? "" : " '" + args.name + "'") + ": ";
  if (spec.kind == CollectiveKind::kBroadcast && (spec.root < 0 || spec.root >= size())) {
    throw PbmError(where + "root " + std::to_string(spec.root) + " is not a rank of a world of size " +
                   std::to_string(size()));
  }
  if (args.count > 0 && args.data == nullptr) throw PbmError(where + "null buffer");
  if (spec.kind == CollectiveKind::kAllreduce) validate_allreduce(args, where);
}

void Engine::validate_allreduce(const AllreduceArgs& args, const std::string& where) const {
  auto fail = [&](const std::string& problem) { throw PbmError(where + problem); };
  if (is_integer(args.dtype) && args.op == ReduceOp::kAvg)
    fail("op='avg' needs a floating-point dtype; use op='sum' for integers");
  if (args.algorithm == Algorithm::kShm || args.algorithm == Algorithm::kHierarchical) {
    if (!node_) fail(std::string("algorithm '") + algorithm_name(args.algorithm) +
                     "' needs the node stage: initialize with pybrain_mpi.init()");
    if (args.algorithm == Algorithm::kShm && !node_->single_node())
      fail("algorithm 'shm' reduces within one node, but the ranks span " + std::to_string(node_->node_count()) +
           " nodes; use algorithm='hierarchical' (or 'auto')");
  }
  if (args.algorithm == Algorithm::kSmall && (!node_ || !node_->single_node() || args.bytes() > SmallAllreduce::kCapacityBytes))
    fail("algorithm 'small' takes messages of at most " + std::to_string(SmallAllreduce::kCapacityBytes) +
         " bytes with every rank on one node (pybrain_mpi.init()); use 'auto'");
  if (args.wire.kind == WireKind::kHalf && !is_half_precision(args.dtype))
    fail(std::string("a 16-bit wire takes bfloat16/float16 buffers, not ") + dtype_name(args.dtype));
  if (!args.wire.threelc()) return;
  if (args.op != ReduceOp::kSum && args.op != ReduceOp::kAvg) fail("3LC compression needs op 'sum' or 'avg'");
  if (args.dtype != DType::kFloat32 && !is_half_precision(args.dtype))
    fail(std::string("3LC compression takes float32/bfloat16/float16, not ") + dtype_name(args.dtype));
  if (!(args.wire.sparsity >= 1.0f && args.wire.sparsity < 2.0f)) fail("3LC sparsity must be in [1, 2)");
  if (!args.wire.state) fail("3LC compression needs its error-feedback state");
  if (args.wire.state->count() != args.count)
    fail("the tensor has " + std::to_string(args.count) + " elements but its ThreeLC state was made for " +
         std::to_string(args.wire.state->count()) + "; keep one state per tensor");
}

AllreduceAlgorithm* Engine::plan(AllreduceArgs& args) const {
  // Resolved once, here. The join header keeps the algorithm the caller asked for (what
  // every rank must agree on); the args carry the one that runs.
  args.algorithm = algorithms_.resolve(args);
  args.divisor = args.op == ReduceOp::kAvg ? static_cast<double>(size()) : 1.0;
  AllreduceAlgorithm& algorithm = algorithms_.select(args);
  // A compressing path binds the state's residuals of its layout (made on first use).
  if (args.wire.threelc()) {
    if (const std::optional<ThreeLCLayout> layout = algorithm.threelc_layout(args))
      args.residuals = args.wire.state->bind(*layout, args.name);
  }
  return &algorithm;
}

std::shared_ptr<Operation> Engine::make_operation(CollectiveSpec spec, double timeout_s) {
  // Called with mu_ held: sequence numbers (and the places that name unnamed calls) follow
  // submission order.
  validate(spec);
  if (stopping_) throw PbmError("rank " + std::to_string(rank()) + ": pybrain-mpi was shut down");
  throw_if_broken();
  // The operation's header describes the call as asked for, before plan() resolves it. A
  // call plan() refuses (a 3LC state of another layout) takes no sequence number or place.
  const bool unnamed = spec.args.name.empty();
  auto op = std::make_shared<Operation>(std::move(spec), next_seq_, unnamed ? next_unnamed_ + 1 : 0,
                                        deadline_after(timeout_s));
  if (op->spec().kind == CollectiveKind::kAllreduce) op->set_algorithm(plan(op->args()));
  ++next_seq_;
  if (unnamed) ++next_unnamed_;
  return op;
}

void Engine::fail_unordered(Operation& op, const char* why) {
  std::ostringstream message;
  message << "rank " << rank() << ": " << op.describe() << ": ranks called collectives of different names "
          << why << ":";
  for (int r = 0; r < size(); ++r) message << "\n  rank " << r << ": " << describe_header(handshake_.header(r));
  op.finish(std::make_exception_ptr(CollectiveMismatchError(message.str())));
}

std::shared_ptr<Operation> Engine::submit(CollectiveSpec spec) {
  std::shared_ptr<Operation> op;
  {
    std::lock_guard<std::mutex> lock(mu_);
    op = make_operation(std::move(spec), timeout_s_);
    if (progress_thread_.joinable()) {
      queue_.push_back(op);
      queue_cv_.notify_all();
      return op;
    }
    executing_ = true;
  }
  // No progress thread: execute now, on this thread. Nothing can be reordered then: every
  // rank runs its call at once, so a peer's other call cannot wait for this one.
  if (!execute(*op, deadline_after(timeout_s_)))
    fail_unordered(*op, "and this engine has no progress thread (the MPI library lacks MPI_THREAD_MULTIPLE), "
                        "so calls cannot be reordered: submit them in the same order on every rank");
  {
    std::lock_guard<std::mutex> lock(mu_);
    executing_ = false;
  }
  return op;
}

void Engine::run(CollectiveSpec spec, double timeout_s) {
  if (timeout_s < 0) timeout_s = timeout_s_;
  std::shared_ptr<Operation> op;
  bool run_here = false;
  bool handed_off = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    op = make_operation(std::move(spec), timeout_s);
    if (queue_.empty() && agreed_.empty() && !executing_ && !negotiating_) {
      executing_ = true;
      run_here = true;
    } else {
      queue_.push_back(op);
      queue_cv_.notify_all();
    }
  }
  if (run_here) {
    const bool ran = execute(*op, deadline_after(timeout_s));
    std::lock_guard<std::mutex> lock(mu_);
    executing_ = false;
    if (!ran && progress_thread_.joinable()) {
      // The ranks proposed different collectives: the progress thread negotiates. Nothing
      // was queued before this call (it ran here), so it is the oldest pending one.
      queue_.push_front(op);
      negotiating_ = true;
      handed_off = true;
      queue_cv_.notify_all();
    } else if (!ran) {
      fail_unordered(*op, "and this engine has no progress thread (the MPI library lacks MPI_THREAD_MULTIPLE), "
                          "so calls cannot be reordered: submit them in the same order on every rank");
    } else if (!queue_.empty()) {
      // Wake the progress thread only if async work was queued meanwhile: waking it for
      // nothing costs two context switches per call, on a core another rank may need.
      queue_cv_.notify_all();
    }
  }
  if ((!run_here || handed_off) && !op->wait(timeout_s > 0 ? timeout_s : -1.0)) {
    const std::vector<int> waiting = op->status().waiting_for();
    std::ostringstream message;
    message << "rank " << rank() << ": " << op->describe() << " timed out after " << timeout_s
            << " s while " << op->status().phase();
    throw CollectiveTimeoutError(message.str(), waiting);
  }
  op->rethrow_if_failed();
}

void Engine::progress_loop() {
  Transport::set_polite_polling_for_this_thread(true);
  // Between negotiation rounds that decided nothing (a rank has not submitted its share
  // yet), wait for a submission here, or this long, doubling up to a cap.
  constexpr auto kFirstBackOff = std::chrono::microseconds(100);
  constexpr auto kMaxBackOff = std::chrono::microseconds(10000);
  auto back_off = kFirstBackOff;
  for (;;) {
    std::shared_ptr<Operation> op;
    bool from_agreed = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      queue_cv_.wait(lock, [&] {
        return stopping_ || (!executing_ && (!agreed_.empty() || !queue_.empty() || negotiating_));
      });
      if (stopping_) break;
      executing_ = true;
      if (!agreed_.empty()) {
        op = agreed_.front();
        agreed_.pop_front();
        from_agreed = true;
      } else if (!negotiating_) {
        op = queue_.front();
        queue_.pop_front();
      }
    }
    if (!op) {
      const uint64_t submitted = [&] {
        std::lock_guard<std::mutex> lock(mu_);
        return next_seq_;
      }();
      const bool decided = negotiate();
      std::unique_lock<std::mutex> lock(mu_);
      if (decided) {
        back_off = kFirstBackOff;
      } else {
        queue_cv_.wait_for(lock, back_off, [&] { return stopping_ || next_seq_ != submitted; });
        back_off = std::min(back_off * 2, kMaxBackOff);
      }
    } else if (!execute(*op, deadline_after(timeout_s_))) {
      if (from_agreed) {
        // Cannot happen while every rank takes the same decision; never pair it regardless.
        fail_unordered(*op, "after the ranks had agreed on its place");
        mark_broken("the ranks ran a negotiated order differently");
      } else {
        std::lock_guard<std::mutex> lock(mu_);
        queue_.push_front(op);  // it was the oldest pending: submission order is kept
        negotiating_ = true;
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      executing_ = false;
    }
    queue_cv_.notify_all();
  }
}

bool Engine::negotiate() {
  std::vector<std::shared_ptr<Operation>> listed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < queue_.size() && i < kMaxProposals; ++i) listed.push_back(queue_[i]);
  }
  auto remove = [&](const std::shared_ptr<Operation>& op) {  // with mu_ held
    const auto it = std::find(queue_.begin(), queue_.end(), op);
    if (it != queue_.end()) queue_.erase(it);  // (shutdown may have taken it meanwhile)
  };
  std::vector<CollectiveHeader> headers;
  headers.reserve(listed.size());
  for (const auto& op : listed) headers.push_back(op->header());
  const Describe what = [&] {
    return listed.empty() ? std::string("negotiation (nothing pending on this rank)")
                          : "negotiation for " + listed.front()->describe();
  };
  // The round reports to no operation: each one's status keeps the ranks that, at the last
  // round, had not submitted it (what a timed-out waiter is told). A peer that does not
  // answer the round itself is named by the round's own timeout.
  const Progress progress(deadline_after(timeout_s_), what, nullptr);
  bool broken = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    broken = !broken_reason_.empty();
  }
  std::exception_ptr round_error;
  if (!broken) {
    try {
      negotiator_.exchange(headers, progress);
      ++negotiation_rounds_;
    } catch (const std::exception& error) {
      // A peer that does not answer a round (stopped, dead) or a malformed list: the rounds
      // are out of step, nothing later can be matched.
      mark_broken(error.what());
      round_error = std::current_exception();
      broken = true;
    }
  }
  if (broken) {
    // What this round listed fails with the round's error (a timeout names the peers that
    // did not answer); everything else pending with the error that broke the engine.
    std::deque<std::shared_ptr<Operation>> failed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      failed.swap(queue_);
      negotiating_ = false;
    }
    if (round_error) {
      for (auto& op : listed) op->finish(round_error);
    }
    for (auto& op : failed) {
      if (!op->done()) execute(*op, Clock::now());
    }
    return true;
  }
  const NegotiationDecision decision = negotiator_.decide();
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& mismatch : decision.mismatched) {
    remove(listed[mismatch.index]);
    listed[mismatch.index]->finish(std::make_exception_ptr(CollectiveMismatchError(mismatch.message)));
  }
  for (const size_t index : decision.run) {
    remove(listed[index]);
    agreed_.push_back(listed[index]);
  }
  if (!decision.run.empty() || !decision.mismatched.empty() || decision.all_empty) {
    negotiating_ = false;
    return true;
  }
  // Nothing every rank has: tell each waiter who is missing; fail what is past its time.
  const Clock::time_point now = Clock::now();
  for (size_t i = 0; i < listed.size(); ++i) {
    const std::vector<int> missing = negotiator_.missing(i);
    std::ostringstream who;
    for (size_t k = 0; k < missing.size(); ++k) who << (k ? ", " : "") << missing[k];
    const std::string ranks = (missing.size() == 1 ? "rank " : "ranks ") + who.str();
    if (now < listed[i]->expires_at()) {
      listed[i]->status().set("waiting for " + ranks + " to submit it", missing);
      continue;
    }
    std::ostringstream message;
    message << "rank " << rank() << ": " << listed[i]->describe() << " timed out: " << ranks
            << (missing.size() == 1 ? " has" : " have")
            << " not submitted a collective of this name (the ranks may submit in any order, but each "
               "must submit every name)";
    remove(listed[i]);
    // A rank that gave up on a name cannot pair it later: a late peer's call would meet
    // this rank's next one of that name.
    if (broken_reason_.empty()) broken_reason_ = message.str();
    listed[i]->finish(std::make_exception_ptr(CollectiveTimeoutError(message.str(), missing)));
  }
  return false;
}

void Engine::mark_broken(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_reason_.empty()) broken_reason_ = reason;
}

void Engine::throw_if_broken() const {
  // Called with mu_ held.
  if (!broken_reason_.empty()) {
    throw PbmError("rank " + std::to_string(rank()) +
                   ": pybrain-mpi cannot run more collectives after an earlier failure left the "
                   "ranks out of step: " + broken_reason_);
  }
}

bool Engine::execute(Operation& op, Clock::time_point deadline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!broken_reason_.empty()) {
      try {
        throw_if_broken();
      } catch (...) {
        op.finish(std::current_exception());
        return true;
      }
    }
  }
  const Describe what = [&op] { return op.describe(); };
  const Progress progress(deadline, what, &op.status());
  try {
    switch (op.spec().kind) {
      case CollectiveKind::kAllreduce:
        if (!execute_allreduce(op, progress)) return false;
        break;
      case CollectiveKind::kBroadcast: {
        const AllreduceArgs& args = op.spec().args;
        if (!handshake_.exchange(op.header(), nullptr, progress)) return false;
        mpi_broadcast(transport_, args.data, args.bytes(), op.spec().root, progress);
        break;
      }
      case CollectiveKind::kBarrier:
        if (!handshake_.exchange(op.header(), nullptr, progress)) return false;
        break;
    }
    op.finish(nullptr);
  } catch (const CollectiveMismatchError& error) {
    // Headers agreed on the name but not the shape: every rank raised the same error
    // and no data moved, so later collectives can still match.
    if (handshake_.order_broken() || error.order_broken()) mark_broken(error.what());
    op.finish(std::current_exception());
  } catch (const AgreedFailureError&) {
    op.finish(std::current_exception());
  } catch (const std::exception& error) {
    mark_broken(error.what());
    op.finish(std::current_exception());
  }
  return true;
}

bool Engine::execute_allreduce(Operation& op, const Progress& progress) {
  AllreduceArgs& args = op.args();
  AllreduceAlgorithm& algorithm = *op.algorithm();
  void* const user = args.data;
  const DType user_dtype = args.dtype;
  // 16-bit floats accumulate in float32 on the algorithms that reduce whole buffers: a
  // widened copy in persistent scratch, narrowed back into the caller's buffer at the end.
  const bool widen = algorithm.widens(args);
  if (widen) {
    auto* work = reinterpret_cast<float*>(transport_.scratch(kScratchWiden, args.count * sizeof(float)));
    widen_to_float32(static_cast<const uint16_t*>(user), work, args.count, user_dtype);
    args.data = work;
    args.dtype = DType::kFloat32;
  }
  const JoinRequest join = algorithm.join(args);
  args.header = &op.header();
  if (!join.self_joined && !join_allreduce(op, join, !widen, progress)) {
    args.data = user;  // not run: the ranks negotiate first
    args.dtype = user_dtype;
    return false;
  }
  const AllreduceResult result = algorithm.run(args, progress);
  if (result.join_instead) {
    // A peer joined by message (another call, submitted in another order): join the same
    // way, so every rank sees every name. The names differ (false: negotiate), or one name
    // has two descriptions (the handshake raises the mismatch on every rank).
    JoinRequest by_message = join;
    by_message.self_joined = false;
    by_message.payload = false;
    by_message.zero_copy = false;
    if (!join_allreduce(op, by_message, !widen, progress)) {
      args.data = user;
      args.dtype = user_dtype;
      return false;
    }
    throw CollectiveMismatchError("rank " + std::to_string(rank()) + ": " + op.describe() +
                                      ": the ranks agreed on its name but chose different algorithms for it",
                                  true);
  }
  if (result.negotiate) {  // a self-joining algorithm saw other names: nothing moved
    args.data = user;
    args.dtype = user_dtype;
    return false;
  }
  if (widen) {
    narrow_from_float32(static_cast<const float*>(args.data), static_cast<uint16_t*>(user), args.count, user_dtype);
    args.data = user;
    args.dtype = user_dtype;
  }
  // Paths that could not check inside their own reduce scan the result once; every rank
  // holds the same result, so every rank reaches the same answer.
  if (result.finite_known) {
    op.set_finite(result.finite);
  } else if (args.check_finite) {
    op.set_finite(all_finite(user, args.count, user_dtype));
  }
  return true;
}

bool Engine::join_allreduce(Operation& op, const JoinRequest& request, bool in_place, const Progress& progress) {
  AllreduceArgs& args = op.args();
  CollectiveHeader header = op.header();
  // Tiny allreduces travel inside the join message itself (join_allreduce.h).
  if (request.payload) header.payload_bytes = static_cast<uint32_t>(args.bytes());
  // Zero-copy: tell the node where our buffer lies in the pool; the node ranks then agree
  // from each other's headers (not part of the agreement: they copy when locations differ).
  const bool zero_copy = request.zero_copy && in_place && node_;
  ZeroCopyPlacement here;
  if (zero_copy && args.count > 0 && node_->pool().locate(args.data, args.bytes(), &here)) {
    header.shm_window = here.window;
    header.shm_offset = here.offset;
  }
  if (!handshake_.exchange(header, request.payload ? args.data : nullptr, progress)) return false;
  args.placement = zero_copy ? agreed_placement(args.bytes()) : ZeroCopyPlacement{};
  return true;
}

ZeroCopyPlacement Engine::agreed_placement(size_t bytes) const {
  // Every node rank sees the same headers of its node, so all make the same choice.
  const std::vector<int>& members = node_->node_world_ranks();
  const CollectiveHeader& first = handshake_.header(members[0]);
  if (first.shm_window < 0) return {};
  for (int member : members) {
    const CollectiveHeader& h = handshake_.header(member);
    if (h.shm_window != first.shm_window || h.shm_offset != first.shm_offset) return {};
  }
  const ZeroCopyPlacement placement{first.shm_window, first.shm_offset};
  if (!node_->pool().valid(placement, bytes)) return {};
  return placement;
}

void Engine::configure_nodes(int node_color) {
  std::lock_guard<std::mutex> lock(mu_);
  if (node_) throw PbmError("rank " + std::to_string(rank()) + ": the node stage is already set up");
  node_ = std::make_unique<NodeStage>(transport_, node_color);
  algorithms_.add_node_algorithms(*node_);
}

void Engine::shutdown() {
  std::deque<std::shared_ptr<Operation>> abandoned;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    abandoned.swap(agreed_);
    for (auto& op : queue_) abandoned.push_back(op);
    queue_.clear();
    // A collective stuck waiting for a peer that will never come gives up now.
    if (executing_) {
      transport_.abort();
      if (node_) node_->abort();
      algorithms_.abort();
    }
  }
  queue_cv_.notify_all();
  if (progress_thread_.joinable()) progress_thread_.join();
  for (auto& op : abandoned) {
    op->finish(std::make_exception_ptr(
        PbmError("rank " + std::to_string(rank()) + ": " + op->describe() +
                 " was never run: pybrain-mpi was shut down first")));
  }
}

}  // namespace pbm
