#include "hierarchical_allreduce.h"

#include <cstring>
#include <sstream>

#include "../kernels/reduce.h"

namespace pbm {

struct HierarchicalAllreduce::Call {
  const AllreduceArgs& args;
  NodeRounds& rounds;
  size_t esize;
  bool threelc;
  StateCursor cursor;                     // 3LC: this slice's residuals in the state
  std::vector<const float*> node_inputs;  // 3LC float32: the node's copies of a slice
  int failed_slice = -1;                  // the first owned slice whose 3LC stage failed
  ThreeLCFailure failure;
};

HierarchicalAllreduce::HierarchicalAllreduce(NodeStage& node) : node_(node) {
  Transport& world = node.world();
  const int slices = node.slices();
  // For slice s: the rank owning it (local rank s % L) on every node. All splits first
  // (collective over the world), then the duplications inside each ring.
  std::vector<MPI_Comm> subs(slices, MPI_COMM_NULL);
  for (int s = 0; s < slices; ++s) {
    const bool owner = s % node.local_size() == node.local_rank();
    world.check(MPI_Comm_split(world.comm(), owner ? 0 : MPI_UNDEFINED, world.rank(), &subs[s]),
                "MPI_Comm_split (slice ring)");
  }
  rings_.resize(slices);
  for (int s = 0; s < slices; ++s) {
    if (subs[s] == MPI_COMM_NULL) continue;
    auto transport = std::make_unique<Transport>(subs[s]);
    // Messages and missing-rank lists speak world ranks.
    std::vector<int> world_of(transport->size());
    const int world_rank = world.rank();
    world.check(MPI_Allgather(&world_rank, 1, MPI_INT, world_of.data(), 1, MPI_INT, subs[s]),
                "MPI_Allgather (slice ring)");
    transport->set_world_ranks(std::move(world_of));
    MPI_Comm_free(&subs[s]);
    rings_[s].ring = std::make_unique<RingAllreduce>(*transport);
    rings_[s].threelc = std::make_unique<ThreeLCExchange>(*transport);
    rings_[s].transport = std::move(transport);
  }
}

HierarchicalAllreduce::~HierarchicalAllreduce() = default;

void HierarchicalAllreduce::abort() {
  for (auto& ring : rings_)
    if (ring.transport) ring.transport->abort();
}

uint64_t HierarchicalAllreduce::bytes_sent() const {
  uint64_t total = 0;
  for (const auto& ring : rings_)
    if (ring.transport) total += ring.transport->bytes_sent.load();
  return total;
}

const HierarchicalAllreduce::SliceRing* HierarchicalAllreduce::ring_of(int slice) const {
  if (slice >= static_cast<int>(rings_.size()) || !rings_[slice].transport) return nullptr;
  return &rings_[slice];
}

void HierarchicalAllreduce::advance(StateCursor* cursor, int slice, size_t elements) const {
  // First stage: the whole slice; second stage: this rank's partition of it in its ring.
  cursor->first += elements;
  if (const SliceRing* ring = ring_of(slice)) cursor->second += ring->threelc->owner_residual_count(elements);
}

std::optional<ThreeLCLayout> HierarchicalAllreduce::threelc_layout(const AllreduceArgs& args) const {
  if (!args.wire.threelc()) return std::nullopt;
  // One round over the whole buffer: the slices run() walks, in the same order.
  const Partition slices = Partition::aligned(args.count, node_.slices(), NodeStage::slice_align(args.dtype));
  StateCursor cursor;
  for (int s = node_.local_rank(); s < node_.slices(); s += node_.local_size()) advance(&cursor, s, slices.length(s));
  ThreeLCLayout layout;
  layout.path = ThreeLCPath::kHierarchical;
  layout.first = cursor.first;
  layout.second = cursor.second;
  layout.ranks = node_.world().size();
  layout.rank = node_.world().rank();
  return layout;
}

AllreduceResult HierarchicalAllreduce::run(const AllreduceArgs& args, const Progress& progress) {
  if (args.count == 0) return {};
  const bool threelc = args.wire.threelc();
  // 3LC runs as one round (its state is laid out per owned slice of the whole buffer).
  NodeRounds rounds(node_, args, threelc ? args.count : node_.round_elements(args.count, args.dtype));
  Call call{args, rounds, dtype_size(args.dtype), threelc, {}, std::vector<const float*>(node_.local_size()), -1, {}};
  NodeSync& sync = node_.sync();
  uint64_t moved = 0;

  // Join: zero-copy reads peers' buffers in place (see shm_allreduce.cpp).
  if (rounds.zero_copy()) sync.wait("join", progress);
  for (size_t k = 0; k < rounds.rounds(); ++k) {
    rounds.start(k);
    // Copy-in (copy path), as in the single-node stage.
    if (!rounds.zero_copy()) {
      moved += rounds.copy_in();
      sync.wait("copy-in", progress);
    }
    // Each owned slice: the node's sum, then the slice's allreduce among the nodes, then the
    // result to the node's other copies (zero-copy: their buffers; copy path: our arena).
    // Our remaining slices' rings run even after one failed: their peers expect us.
    for (int s = rounds.first_owned(); s < rounds.slice_count(); s += rounds.step_owned())
      moved += finish_slice(call, s, progress);
    if (rounds.zero_copy()) continue;
    // Copy-out (copy path). An agreed failure reached every node through the owners of the
    // failing slice; all node ranks see it after the same sync and raise together.
    sync.wait("reduce", progress);
    raise_agreed_failure(call, progress);
    moved += rounds.copy_out();
  }
  // Final sync: nobody reads our arena or buffer after it; zero-copy, every owner has stored
  // its slices into our buffer (or flagged its failure).
  sync.wait(rounds.zero_copy() ? "push" : "copy-out", progress);
  if (rounds.zero_copy()) raise_agreed_failure(call, progress);
  node_.count_shm_bytes(moved);
  return {};
}

uint64_t HierarchicalAllreduce::finish_slice(Call& call, int s, const Progress& progress) {
  const AllreduceArgs& args = call.args;
  NodeRounds& rounds = call.rounds;
  const size_t n = rounds.slices().length(s);
  if (n == 0) return 0;
  char* out = rounds.mine(s);
  const std::vector<const void*>& inputs = rounds.inputs(s);
  const std::vector<void*>& outputs = rounds.outputs(s);
  // Node stage: the exact sum of the node's copies, undivided (the inter-node stage divides
  // the slice it finishes). 3LC between nodes (float32) forms the sum inside its own
  // encode passes instead.
  const bool sum_in_3lc = call.threelc && args.dtype == DType::kFloat32 && ring_of(s) != nullptr;
  if (sum_in_3lc) {
    for (size_t q = 0; q < inputs.size(); ++q) call.node_inputs[q] = static_cast<const float*>(inputs[q]);
  } else {
    const ReduceInputs reduce{inputs.data(), static_cast<int>(inputs.size()), args.op, 1.0, nullptr, 0};
    reduce_n(out, n, args.dtype, reduce);
  }
  const InterNode done = inter_node(call, Slice{s, out, n, &outputs}, Progress(progress, "inter-node slice", s));
  // Zero-copy after a failure: the peers' buffers keep what they held (every rank raises).
  const bool copy = done == InterNode::kCopiesLeft || (done == InterNode::kFailed && !rounds.zero_copy());
  if (copy)
    for (void* dst : outputs) std::memcpy(dst, out, n * call.esize);
  return n * call.esize * outputs.size();
}

HierarchicalAllreduce::InterNode HierarchicalAllreduce::inter_node(Call& call, const Slice& slice,
                                                                   const Progress& progress) {
  const AllreduceArgs& args = call.args;
  const SliceRing* ring = ring_of(slice.index);
  if (!ring) return InterNode::kCopiesLeft;
  if (!call.threelc) {
    ring->ring->reduce(MutableElements{slice.data, slice.count, args.dtype}, args.op, args.divisor, progress);
    return InterNode::kCopiesLeft;
  }
  // 3LC on the inter-node stage only: the sum is divided by the world size in the final
  // decode (nodes may hold different numbers of ranks), which also stores the result into
  // the node's other copies of the slice.
  ThreeLCExchangeArgs exchange;
  exchange.data = slice.data;
  exchange.count = slice.count;
  exchange.dtype = args.dtype;
  exchange.divisor = args.divisor;
  exchange.sparsity = args.wire.sparsity;
  exchange.block = args.wire.block;
  exchange.residual = args.residuals.first_data() + call.cursor.first;
  exchange.owner_residual = args.residuals.second_data() + call.cursor.second;
  exchange.name = args.name.c_str();
  exchange.also_out = slice.copies;
  const bool summed_here = args.dtype == DType::kFloat32;
  exchange.node_inputs = summed_here ? call.node_inputs.data() : nullptr;
  exchange.node_input_count = summed_here ? static_cast<int>(call.node_inputs.size()) : 0;
  ThreeLCFailure failure = ring->threelc->run(exchange, progress);
  advance(&call.cursor, slice.index, slice.count);  // the layout walk, whatever the outcome
  if (!failure.failed()) return InterNode::kCopiesWritten;
  // Every rank of this slice's ring learnt it alike; the node's other ranks learn it from
  // our flag at the next sync.
  if (!call.failure.failed()) {
    call.failure = std::move(failure);
    call.failed_slice = slice.index;
  }
  node_.sync().flag_failure();
  return InterNode::kFailed;
}

void HierarchicalAllreduce::raise_agreed_failure(const Call& call, const Progress& progress) const {
  const int flagged = node_.sync().failed_rank();
  if (!call.failure.failed() && flagged < 0) return;
  std::ostringstream message;
  message << "rank " << node_.world().rank() << ": " << progress.describe();
  std::vector<int> ranks;
  if (call.failure.failed()) {
    // A slice this rank owns: it knows the ranks whose gradient held NaN/Inf.
    ranks = call.failure.ranks;
    message << ": inter-node slice " << call.failed_slice << ": 3LC found NaN/Inf in the gradient on rank"
            << (ranks.size() > 1 ? "s " : " ");
    for (size_t i = 0; i < ranks.size(); ++i) message << (i ? ", " : "") << ranks[i];
    if (!call.failure.local_error.empty()) message << " (here: " << call.failure.local_error << ")";
  } else {
    // A node peer's slice: it told us through shared memory.
    ranks = {node_.node_world_ranks()[flagged]};
    message << ": 3LC found NaN/Inf in the inter-node stage of the slice owned by node rank " << ranks[0]
            << " (a node's sum of the gradient)";
  }
  // The node stage had already summed parts of the buffer: it is not the input any more.
  message << " (the buffer holds intermediate values; skip this step)";
  throw AgreedFailureError(message.str(), ranks);
}

}  // namespace pbm
