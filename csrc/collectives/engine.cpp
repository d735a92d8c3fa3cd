#include "engine.h"

#include <cmath>
#include <cstring>
#include <sstream>

#include "../kernels/reduce.h"
#include "mpi_allreduce.h"

namespace pbm {

namespace {
// Transport scratch slots used here (handshake uses 0-1, the ring 2).
constexpr size_t kScratchWiden = 3;
constexpr size_t kScratchFold = 4;
// An allreduce whose payload is at most this many bytes travels inside the join message
// itself (all-to-all, then every rank folds the n inputs in rank order). Bounded in total
// bytes too, so the all-to-all never sends much more than the ring would.
constexpr size_t kInlineTotalBytes = 256 * 1024;

bool inline_allreduce(size_t bytes, int n) {
  return bytes <= kMaxInlinePayloadBytes && bytes * static_cast<size_t>(n - 1) <= kInlineTotalBytes;
}

CollectiveHeader header_for(const CollectiveSpec& spec, uint64_t seq) {
  CollectiveHeader header;
  header.seq = seq;
  header.kind = static_cast<int32_t>(spec.kind);
  header.algorithm = static_cast<int32_t>(spec.algorithm);
  header.op = static_cast<int32_t>(spec.op);
  header.dtype = static_cast<int32_t>(spec.dtype);
  header.count = spec.count;
  header.root = spec.root;
  header.sparsity = spec.threelc ? spec.sparsity : 0.f;
  std::strncpy(header.name, spec.name.c_str(), sizeof(header.name) - 1);
  return header;
}
}  // namespace

std::string Operation::describe() const {
  return describe_header(header_for(spec_, seq_));
}

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
    : transport_(comm),
      handshake_(transport_),
      ring_(transport_),
      compressed_(transport_),
      timeout_s_(timeout_s) {
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
  auto fail = [&](const std::string& problem) {
    throw PbmError("rank " + std::to_string(rank()) + ": " + collective_kind_name(spec.kind) +
                   (spec.name.empty() ? "" : " '" + spec.name + "'") + ": " + problem);
  };
  if (spec.kind == CollectiveKind::kAllreduce && is_integer(spec.dtype) &&
      spec.op == ReduceOp::kAvg) {
    fail("op='avg' needs a floating-point dtype; use op='sum' for integers");
  }
  if (spec.kind == CollectiveKind::kBroadcast && (spec.root < 0 || spec.root >= size())) {
    fail("root " + std::to_string(spec.root) + " is not a rank of a world of size " +
         std::to_string(size()));
  }
  if (spec.count > 0 && spec.data == nullptr) fail("null buffer");
  if (spec.kind == CollectiveKind::kAllreduce &&
      (spec.algorithm == Algorithm::kShm || spec.algorithm == Algorithm::kHierarchical)) {
    if (!node_) fail(std::string("algorithm '") + algorithm_name(spec.algorithm) +
                     "' needs the node stage: initialize with pybrain_mpi.init()");
    if (spec.algorithm == Algorithm::kShm && !node_->single_node())
      fail("algorithm 'shm' reduces within one node, but the ranks span " +
           std::to_string(node_->node_count()) +
           " nodes; use algorithm='hierarchical' (or 'auto')");
  }
  if (spec.threelc) {
    if (spec.op != ReduceOp::kSum && spec.op != ReduceOp::kAvg) fail("3LC compression needs op 'sum' or 'avg'");
    if (spec.dtype != DType::kFloat32 && !is_half_precision(spec.dtype))
      fail(std::string("3LC compression takes float32/bfloat16/float16, not ") + dtype_name(spec.dtype));
    if (!(spec.sparsity >= 1.0f && spec.sparsity < 2.0f)) fail("3LC sparsity must be in [1, 2)");
    if (spec.count > 0 && (spec.residual == nullptr || spec.owner_residual == nullptr))
      fail("3LC compression needs its error-feedback state");
  }
}

std::shared_ptr<Operation> Engine::make_operation(CollectiveSpec spec) {
  // Called with mu_ held: sequence numbers follow submission order.
  validate(spec);
  if (stopping_) throw PbmError("rank " + std::to_string(rank()) + ": pybrain-mpi was shut down");
  throw_if_broken();
  return std::make_shared<Operation>(std::move(spec), next_seq_++);
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
  try {
    switch (op.spec().kind) {
      case CollectiveKind::kAllreduce:
        execute_allreduce(op, deadline);
        // Paths that could not check inside their own reduce scan the result once; every rank
        // holds the same result, so every rank reaches the same answer.
        if (op.spec().check_finite && op.finite() < 0)
          op.set_finite(all_finite(op.spec().data, op.spec().count, op.spec().dtype));
        break;
      case CollectiveKind::kBroadcast: execute_broadcast(op, deadline); break;
      case CollectiveKind::kBarrier: {
        CollectiveHeader header = header_for(op.spec(), op.seq());
        handshake_.exchange(header, nullptr, deadline, [&op] { return op.describe(); },
                            &op.status());
        break;
      }
    }
    op.finish(nullptr);
  } catch (const CollectiveMismatchError& error) {
    // Headers agreed on the order but not the shape: every rank raised the same error
    // and no data moved, so later collectives can still match.
    if (handshake_.order_broken()) mark_broken(error.what());
    op.finish(std::current_exception());
  } catch (const AgreedFailureError&) {
    op.finish(std::current_exception());
  } catch (const std::exception& error) {
    mark_broken(error.what());
    op.finish(std::current_exception());
  }
}

void Engine::execute_allreduce(Operation& op, Clock::time_point deadline) {
  const CollectiveSpec& spec = op.spec();
  const int n = size();
  const Describe what = [&op] { return op.describe(); };
  if (spec.threelc) {
    // Compressed data travels in its own messages: the join carries no payload.
    const size_t bytes = spec.count * dtype_size(spec.dtype);
    const Algorithm algorithm =
        spec.algorithm == Algorithm::kAuto ? Algorithm::kRing : resolve_algorithm(spec.algorithm, bytes);
    CollectiveHeader header = header_for(spec, op.seq());
    const bool node_stage = algorithm == Algorithm::kShm || algorithm == Algorithm::kHierarchical;
    if (node_stage) zero_copy_target(spec.data, bytes, &header);
    handshake_.exchange(header, nullptr, deadline, what, &op.status());
    if (!node_stage) {
      compressed_.run(spec.data, spec.count, spec.dtype, spec.op == ReduceOp::kAvg, spec.sparsity,
                      spec.residual, spec.owner_residual, spec.name, deadline, what, &op.status());
      return;
    }
    // Hierarchical: 3LC on the inter-node stage only. One node (shm): nothing crosses a
    // network, so the allreduce is exact and the state is left untouched.
    InterNode inter;
    inter.enabled = algorithm == Algorithm::kHierarchical;
    inter.threelc = inter.enabled;
    inter.sparsity = spec.sparsity;
    inter.residual = spec.residual;
    inter.owner_residual = spec.owner_residual;
    inter.name = spec.name;
    uint64_t offset = 0;
    const int32_t window = agreed_zero_copy_window(bytes, &offset);
    node_->allreduce(spec.data, spec.count, spec.dtype, ReduceOp::kSum,
                     spec.op == ReduceOp::kAvg ? static_cast<double>(n) : 1.0, window, offset, inter,
                     deadline, what, &op.status());
    return;
  }
  const Algorithm algorithm =
      resolve_algorithm(spec.algorithm, spec.count * dtype_size(spec.dtype));
  const bool node_stage = algorithm == Algorithm::kShm || algorithm == Algorithm::kHierarchical;
  // 16-bit floats accumulate in float32 (a widened copy in persistent scratch). The
  // single-node stage widens element by element inside its reduce instead.
  void* work = spec.data;
  DType work_dtype = spec.dtype;
  const bool widen = is_half_precision(spec.dtype) && algorithm != Algorithm::kShm &&
                     (!spec.half_wire || algorithm == Algorithm::kMpi);
  if (widen) {
    work = transport_.scratch(kScratchWiden, spec.count * sizeof(float));
    widen_to_float32(static_cast<const uint16_t*>(spec.data), static_cast<float*>(work), spec.count,
                     spec.dtype);
    work_dtype = DType::kFloat32;
  }
  const size_t esize = dtype_size(work_dtype);
  const size_t bytes = spec.count * esize;
  const double divisor = spec.op == ReduceOp::kAvg ? static_cast<double>(n) : 1.0;
  // Explicit shm/hierarchical always run the node stage (also for tiny buffers).
  const bool small = n > 1 && !node_stage && inline_allreduce(bytes, n);

  CollectiveHeader header = header_for(spec, op.seq());
  header.payload_bytes = small ? static_cast<uint32_t>(bytes) : 0;
  if (node_stage && work == spec.data) zero_copy_target(work, bytes, &header);
  handshake_.exchange(header, small ? work : nullptr, deadline, what, &op.status());

  if (n == 1) {
    // Nothing to exchange; avg over one rank is the identity.
  } else if (small) {
    // Fold the n inputs in rank order so every rank computes bitwise the same result.
    char* acc = transport_.scratch(kScratchFold, std::max<size_t>(bytes, 1));
    std::memcpy(acc, handshake_.payload(0), bytes);
    for (int r = 1; r < n; ++r) reduce_into(acc, handshake_.payload(r), spec.count, work_dtype, spec.op);
    if (divisor != 1.0) divide_in_place(acc, spec.count, work_dtype, divisor);
    std::memcpy(work, acc, bytes);
  } else if (node_stage) {
    InterNode inter;
    inter.enabled = algorithm == Algorithm::kHierarchical;
    uint64_t offset = 0;
    const int32_t window = work == spec.data ? agreed_zero_copy_window(bytes, &offset) : -1;
    bool finite = true;
    if (node_->allreduce(work, spec.count, work_dtype, spec.op, divisor, window, offset, inter,
                         deadline, what, &op.status(), spec.check_finite ? &finite : nullptr))
      op.set_finite(finite);
  } else if (algorithm == Algorithm::kMpi) {
    mpi_allreduce(transport_, work, spec.count, work_dtype, spec.op, deadline, what, &op.status());
    if (divisor != 1.0) divide_in_place(work, spec.count, work_dtype, divisor);
  } else {
    ring_.run(work, spec.count, work_dtype, spec.op, divisor, deadline, what, &op.status());
  }

  if (work != spec.data) {
    narrow_from_float32(static_cast<const float*>(work), static_cast<uint16_t*>(spec.data),
                        spec.count, spec.dtype);
  }
}

void Engine::configure_nodes(int node_color) {
  std::lock_guard<std::mutex> lock(mu_);
  if (node_) throw PbmError("rank " + std::to_string(rank()) + ": the node stage is already set up");
  node_ = std::make_unique<NodeStage>(transport_, node_color);
}

Algorithm Engine::resolve_algorithm(Algorithm requested, size_t bytes) const {
  if (!node_) return requested == Algorithm::kAuto ? Algorithm::kRing : requested;
  const bool several_local = node_->max_local_size() > 1;
  switch (requested) {
    case Algorithm::kAuto:
      if (bytes < shm_min_bytes || !several_local) return Algorithm::kRing;
      return node_->single_node() ? Algorithm::kShm : Algorithm::kHierarchical;
    case Algorithm::kHierarchical:
      // One node: the node stage is the whole allreduce. One rank per node: the ring is.
      if (node_->single_node()) return Algorithm::kShm;
      return several_local ? Algorithm::kHierarchical : Algorithm::kRing;
    default:
      return requested;
  }
}

void Engine::zero_copy_target(const void* data, size_t bytes, CollectiveHeader* header) const {
  int32_t window = -1;
  uint64_t offset = 0;
  if (node_ && bytes > 0 && node_->locate(data, bytes, &window, &offset)) {
    header->shm_window = window;
    header->shm_offset = offset;
  }
}

int32_t Engine::agreed_zero_copy_window(size_t bytes, uint64_t* offset) const {
  // Every node rank sees the same headers of its node, so all make the same choice.
  const std::vector<int>& members = node_->node_world_ranks();
  const CollectiveHeader& first = handshake_.header(members[0]);
  if (first.shm_window < 0) return -1;
  for (int member : members) {
    const CollectiveHeader& h = handshake_.header(member);
    if (h.shm_window != first.shm_window || h.shm_offset != first.shm_offset) return -1;
  }
  if (!node_->pool_region_valid(first.shm_window, first.shm_offset, bytes)) return -1;
  *offset = first.shm_offset;
  return first.shm_window;
}

void Engine::execute_broadcast(Operation& op, Clock::time_point deadline) {
  const CollectiveSpec& spec = op.spec();
  const Describe what = [&op] { return op.describe(); };
  CollectiveHeader header = header_for(spec, op.seq());
  handshake_.exchange(header, nullptr, deadline, what, &op.status());
  mpi_broadcast(transport_, spec.data, spec.count * dtype_size(spec.dtype), spec.root, deadline,
                what, &op.status());
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
