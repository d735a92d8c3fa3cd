#include "node_stage.h"

#include <algorithm>
#include <cstring>

namespace pbm {

NodeStage::NodeStage(Transport& world, int node_color) : world_(world) {
  MPI_Comm comm = world.comm();
  const int world_rank = world.rank();
  const int world_size = world.size();
  world.check(MPI_Comm_split(comm, node_color, world_rank, &node_comm_), "MPI_Comm_split (node)");
  MPI_Comm_set_errhandler(node_comm_, MPI_ERRORS_RETURN);
  world.check(MPI_Comm_dup(node_comm_, &pool_comm_), "MPI_Comm_dup (node pool)");
  MPI_Comm_rank(node_comm_, &local_rank_);
  MPI_Comm_size(node_comm_, &local_size_);
  world_of_local_.assign(local_size_, 0);
  world.check(MPI_Allgather(&world_rank, 1, MPI_INT, world_of_local_.data(), 1, MPI_INT, node_comm_),
              "MPI_Allgather (node ranks)");

  // Every rank learns every rank's node and local size: the slice count P and the slice
  // rings must be the same everywhere.
  const int mine[3] = {node_color, local_rank_, local_size_};
  std::vector<int> all(3 * static_cast<size_t>(world_size));
  world.check(MPI_Allgather(mine, 3, MPI_INT, all.data(), 3, MPI_INT, comm), "MPI_Allgather (topology)");
  std::vector<int> colors;
  for (int r = 0; r < world_size; ++r) {
    colors.push_back(all[3 * r]);
    slices_ = std::max(slices_, all[3 * r + 2]);
  }
  std::sort(colors.begin(), colors.end());
  node_count_ = static_cast<int>(std::unique(colors.begin(), colors.end()) - colors.begin());

  pool_ = std::make_unique<SharedPool>(world, pool_comm_, local_rank_);
  sync_ = std::make_unique<NodeSync>(world, node_comm_, local_rank_, world_of_local_);
}

NodeStage::~NodeStage() {
  // The pool's windows stay mapped (tensors from pbm.shared_empty may still point into them)
  // but their pages are handed back, so pybrain_mpi.shutdown() followed by init() again does
  // not keep the old buffers resident; the arena is internal and is unmapped.
  // Only while MPI is live: after MPI_Finalize the addresses may belong to other mappings.
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  free_shared_window(world_, arena_);
  pool_->release_pages();
  if (pool_comm_ != MPI_COMM_NULL) MPI_Comm_free(&pool_comm_);
}

void NodeStage::ensure_arena(size_t bytes) {
  if (arena_bytes_ >= bytes) return;
  // Every collective ends with a sync after the last read of the arena, so no peer still
  // reads the old one.
  const size_t grown = std::max(bytes, 2 * arena_bytes_);
  free_shared_window(world_, arena_);
  arena_ = allocate_shared_window(world_, node_comm_, grown);
  arena_bytes_ = grown;
}

size_t NodeStage::round_elements(size_t count, DType dtype) const {
  const size_t esize = dtype_size(dtype);
  const size_t unit = slice_align(dtype) * static_cast<size_t>(slices_);
  return std::min(std::max(unit, chunk_bytes / esize / unit * unit), count);
}

NodeRounds::NodeRounds(NodeStage& node, const AllreduceArgs& args, size_t round_elements)
    : node_(node),
      data_(static_cast<char*>(args.data)),
      count_(args.count),
      esize_(dtype_size(args.dtype)),
      align_(NodeStage::slice_align(args.dtype)),
      local_size_(node.local_size()),
      slice_count_(node.slices()),
      me_(node.local_rank()),
      zero_copy_(args.placement.valid()),
      chunk_(std::max<size_t>(round_elements, 1)),
      rounds_((args.count + chunk_ - 1) / chunk_),
      half_bytes_(round_up(chunk_ * esize_, 64)),
      slices_(Partition::aligned(0, node.slices(), align_)),
      inputs_(node.local_size()) {
  if (zero_copy_) node.pool().addresses(args.placement, &peer_);
  if (!zero_copy_ && local_size_ > 1) node.ensure_arena(rounds_ > 1 ? 2 * half_bytes_ : half_bytes_);
  outputs_.reserve(local_size_);
}

void NodeRounds::start(size_t round) {
  round_ = round;
  lo_ = round * chunk_;
  slices_ = Partition::aligned(std::min(chunk_, count_ - lo_), slice_count_, align_);
}

char* NodeRounds::source(int q, int s) const {
  const size_t at = slices_.begin(s) * esize_;
  return zero_copy_ ? peer_[q] + lo_ * esize_ + at : arena(q) + at;
}

const std::vector<const void*>& NodeRounds::inputs(int s) {
  for (int q = 0; q < local_size_; ++q) inputs_[q] = q == me_ ? mine(s) : source(q, s);
  return inputs_;
}

const std::vector<void*>& NodeRounds::outputs(int s) {
  outputs_.clear();
  if (zero_copy_) {
    for (int q = 0; q < local_size_; ++q)
      if (q != me_) outputs_.push_back(source(q, s));
  } else if (local_size_ > 1) {
    outputs_.push_back(arena(me_) + slices_.begin(s) * esize_);
  }
  return outputs_;
}

uint64_t NodeRounds::copy_in() {
  // Only the slices peers reduce; our own is read from our buffer.
  uint64_t moved = 0;
  for (int s = 0; s < slice_count_; ++s) {
    if (s % local_size_ == me_ || slices_.length(s) == 0) continue;
    std::memcpy(arena(me_) + slices_.begin(s) * esize_, mine(s), slices_.length(s) * esize_);
    moved += slices_.length(s) * esize_;
  }
  return moved;
}

uint64_t NodeRounds::copy_out() {
  uint64_t moved = 0;
  for (int s = 0; s < slice_count_; ++s) {
    const int owner = s % local_size_;
    if (owner == me_ || slices_.length(s) == 0) continue;
    std::memcpy(mine(s), source(owner, s), slices_.length(s) * esize_);
    moved += slices_.length(s) * esize_;
  }
  return moved;
}

}  // namespace pbm
