#include "engine.h"

#include <cmath>
#include <cstring>
#include <sstream>

#include "../kernels/reduce.h"
#include "mpi_allreduce.h"
#include "small_allreduce.h"

namespace pbm {

namespace {
CollectiveHeader header_for(const CollectiveSpec& spec, uint64_t seq) {
  const AllreduceArgs& args = spec.args;
  CollectiveHeader header;
  header.seq = seq;
  header.kind = static_cast<int32_t>(spec.kind);
  header.algorithm = static_cast<int32_t>(args.algorithm);
  header.op = static_cast<int32_t>(args.op);
  header.dtype = static_cast<int32_t>(args.dtype);
  header.count = args.count;
  header.root = spec.root;
  header.sparsity = args.wire.threelc() ? args.wire.sparsity : 0.f;
  std::strncpy(header.name, args.name.c_str(), sizeof(header.name) - 1);
  return header;
}
}  // namespace

Operation::Operation(CollectiveSpec spec, uint64_t seq)
    : spec_(std::move(spec)), seq_(seq), header_(header_for(spec_, seq)) {}

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
    finished_ = true;
    error_ = error;
  }
  finished_cv_.notify_all();
}

Engine::Engine(MPI_Comm comm, double timeout_s, bool progress_thread)
    : transport_(comm), handshake_(transport_), algorithms_(transport_, handshake_), timeout_s_(timeout_s) {
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

std::shared_ptr<Operation> Engine::make_operation(CollectiveSpec spec) {
  // Called with mu_ held: sequence numbers follow submission order.
  validate(spec);
  if (stopping_) throw PbmError("rank " + std::to_string(rank()) + ": pybrain-mpi was shut down");
  throw_if_broken();
  // The operation's header describes the call as asked for, before plan() resolves it. A
  // call plan() refuses (a 3LC state of another layout) takes no sequence number.
  auto op = std::make_shared<Operation>(std::move(spec), next_seq_);
  if (op->spec().kind == CollectiveKind::kAllreduce) op->set_algorithm(plan(op->args()));
  ++next_seq_;
  return op;
}

std::shared_ptr<Operation> Engine::submit(CollectiveSpec spec) {
  std::shared_ptr<Operation> op;
  {
    std::lock_guard<std::mutex> lock(mu_);
    op = make_operation(std::move(spec));
    if (progress_thread_.joinable()) {
      queue_.push_back(op);
      queue_cv_.notify_all();
      return op;
    }
    executing_ = true;
  }
  // No progress thread: execute now, on this thread.
  execute(*op, deadline_after(timeout_s_));
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
  {
    std::unique_lock<std::mutex> lock(mu_);
    op = make_operation(std::move(spec));
    if (queue_.empty() && !executing_) {
      executing_ = true;
      run_here = true;
    } else {
      queue_.push_back(op);
      queue_cv_.notify_all();
    }
  }
  if (run_here) {
    execute(*op, deadline_after(timeout_s));
    std::lock_guard<std::mutex> lock(mu_);
    executing_ = false;
    // Wake the progress thread only if async work was queued meanwhile: waking it for
    // nothing costs two context switches per call, on a core another rank may need.
    if (!queue_.empty()) queue_cv_.notify_all();
  } else if (!op->wait(timeout_s > 0 ? timeout_s : -1.0)) {
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
  for (;;) {
    std::shared_ptr<Operation> op;
    {
      std::unique_lock<std::mutex> lock(mu_);
      queue_cv_.wait(lock, [&] { return stopping_ || (!queue_.empty() && !executing_); });
      if (stopping_) break;
      op = queue_.front();
      queue_.pop_front();
      executing_ = true;
    }
    execute(*op, deadline_after(timeout_s_));
    {
      std::lock_guard<std::mutex> lock(mu_);
      executing_ = false;
    }
    queue_cv_.notify_all();
  }
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

void Engine::execute(Operation& op, Clock::time_point deadline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!broken_reason_.empty()) {
      try {
        throw_if_broken();
      } catch (...) {
        op.finish(std::current_exception());
        return;
      }
    }
  }
  const Describe what = [&op] { return op.describe(); };
  const Progress progress(deadline, what, &op.status());
  try {
    switch (op.spec().kind) {
      case CollectiveKind::kAllreduce: execute_allreduce(op, progress); break;
      case CollectiveKind::kBroadcast: {
        const AllreduceArgs& args = op.spec().args;
        handshake_.exchange(op.header(), nullptr, progress);
        mpi_broadcast(transport_, args.data, args.bytes(), op.spec().root, progress);
        break;
      }
      case CollectiveKind::kBarrier: handshake_.exchange(op.header(), nullptr, progress); break;
    }
    op.finish(nullptr);
  } catch (const CollectiveMismatchError& error) {
    // Headers agreed on the order but not the shape: every rank raised the same error
    // and no data moved, so later collectives can still match.
    if (handshake_.order_broken() || error.order_broken()) mark_broken(error.what());
    op.finish(std::current_exception());
  } catch (const AgreedFailureError&) {
    op.finish(std::current_exception());
  } catch (const std::exception& error) {
    mark_broken(error.what());
    op.finish(std::current_exception());
  }
}

void Engine::execute_allreduce(Operation& op, const Progress& progress) {
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
  if (!join.self_joined) join_allreduce(op, join, !widen, progress);
  const AllreduceResult result = algorithm.run(args, progress);
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
}

void Engine::join_allreduce(Operation& op, const JoinRequest& request, bool in_place, const Progress& progress) {
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
  handshake_.exchange(header, request.payload ? args.data : nullptr, progress);
  args.placement = zero_copy ? agreed_placement(args.bytes()) : ZeroCopyPlacement{};
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
    abandoned.swap(queue_);
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
