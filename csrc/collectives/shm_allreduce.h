// The node stage of pybrain-mpi's shared-memory and hierarchical allreduces
// (algorithm "shm" and "hierarchical", issue 6).
//
// Ranks of one node (MPI_COMM_TYPE_SHARED, or blocks of PBM_RANKS_PER_NODE ranks) map each
// other's memory through MPI-3 shared windows, so the node-local reduce and broadcast are
// plain loads and stores: every rank reduces the slices it owns directly from all peers'
// memory in one pass, then copies the other slices from their owners.
//
//   shm          one node: node reduce-scatter + node allgather.
//   hierarchical node reduce-scatter, then for each slice a ring allreduce among the ranks
//                owning that slice on every node (every rank stays busy, not one leader per
//                node), then node allgather. 3LC compression, when asked for, is applied on
//                that inter-node stage only; the node stage stays exact.
//
// Slices: the buffer (or each round of it, see chunk_bytes) is cut into P = the largest
// node's rank count slices, 64-byte aligned. On a node with L ranks, slice s belongs to
// local rank s % L. With equal nodes each rank owns one slice and the slice rings are the
// "same local rank on every node" rings; with uneven nodes (3 ranks as 2+1) the rank of the
// smaller node owns several slices and joins several rings, always in increasing slice order,
// so no two ranks wait on each other in opposite orders. Results are exact: each slice is
// reduced by one rank, in local-rank order, and copied from it.
//
// Synchronisation between node ranks uses sequence-numbered flags in a shared control area
// (one cache line per rank, std::atomic with release/acquire), spinning then yielding, with
// the collective's deadline: a rank that never arrives is named (as its world rank) in a
// CollectiveTimeoutError. Nothing here waits without a deadline except window allocation,
// which is collective over the node by nature (like MPI_Comm_dup at init).
#pragma once

#include <mpi.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../common/dtype.h"
#include "compressed_allreduce.h"
#include "ring_allreduce.h"
#include "transport.h"

namespace pbm {

// One MPI shared-memory window: this rank's segment and every node peer's, mapped here.
struct SharedWindow {
  MPI_Win win = MPI_WIN_NULL;
  std::vector<char*> base;     // by local rank
  std::vector<size_t> bytes;   // segment size by local rank
};

// How an allreduce is to cross the nodes after the node reduce-scatter.
struct InterNode {
  bool enabled = false;  // hierarchical: ring (or 3LC) per owned slice among the nodes
  bool threelc = false;
  float sparsity = 1.0f;
  float* residual = nullptr;        // float32 x owned_elements(count): first-stage state
  float* owner_residual = nullptr;  // float32 x owner_residual_elements(count)
  std::string name;
};

class NodeStage {
 public:
  // Collective over the world transport's communicator. `node_color` is the same for all
  // ranks of one node (pybrain_mpi passes the node's lowest world rank).
  NodeStage(Transport& world, int node_color);
  ~NodeStage();
  NodeStage(const NodeStage&) = delete;
  NodeStage& operator=(const NodeStage&) = delete;

  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  int node_count() const { return node_count_; }
  int max_local_size() const { return slices_; }
  bool single_node() const { return node_count_ == 1; }
  const std::vector<int>& node_world_ranks() const { return world_of_local_; }

  // --- zero-copy pool (pbm.shared_empty) ---
  // Returns `bytes` of memory inside this rank's segment of a shared window. Collective
  // over the node: every node rank must make the same calls with the same sizes in the same
  // order, so equal buffers land at equal offsets on every rank (a bump allocator over
  // windows that double in size). Thread-safe against running collectives.
  void* shared_alloc(size_t bytes);
  // Makes all pool memory reusable by later shared_alloc calls (earlier buffers alias it).
  void shared_reset();
  // If [data, data+bytes) lies in a pool window, sets its window index and offset.
  bool locate(const void* data, size_t bytes, int32_t* window, uint64_t* offset) const;
  // Whether (window, offset) names `bytes` valid on every node rank's segment.
  bool pool_region_valid(int32_t window, uint64_t offset, size_t bytes) const;

  // --- the allreduce ---
  // Reduces `data` (count elements, any supported dtype; 16-bit floats accumulate in float32
  // on the node stage) in place. `zero_copy_window` >= 0: every node rank's buffer lies at
  // `zero_copy_offset` of that pool window (checked by the caller through the join headers),
  // so the node stage reads peers' buffers directly instead of copying them in.
  // `divisor` != 1 divides the result (avg over the world).
  // `finite` (may be null): on the zero-copy single-node path with float32/float64 data, set
  // to whether every element of the result is finite, computed inside the reduce pass (each
  // owner flags its slices in the control area); returns whether it was set, so the caller
  // scans the result itself otherwise.
  bool allreduce(void* data, size_t count, DType dtype, ReduceOp op, double divisor,
                 int32_t zero_copy_window, uint64_t zero_copy_offset, const InterNode& inter,
                 Clock::time_point deadline, const Describe& what, ProgressStatus* status,
                 bool* finite = nullptr);

  // 3LC state sizes for a compressed hierarchical allreduce of `count` elements.
  size_t owned_elements(size_t count, DType dtype) const;
  size_t owner_residual_elements(size_t count, DType dtype) const;

  // Gives up every wait at once (engine shutdown).
  void abort() { aborted_.store(true); world_.abort(); for (auto& t : slice_transports_) if (t) t->abort(); }

  // Bytes this rank moved through shared memory (copied into or out of peers' view).
  uint64_t shm_bytes() const { return shm_bytes_.load(); }
  // Bytes handed to MPI by the inter-node rings.
  uint64_t bytes_sent() const;

  // Rounds of the copy path (bytes of buffer per round): copy-in, reduce and copy-out of a
  // round stay in cache. PBM_SHM_CHUNK_BYTES.
  size_t chunk_bytes = 4 << 20;

 private:
  struct Layout;
  void sync(const char* phase, Clock::time_point deadline, const Describe& what,
            ProgressStatus* status);
  void ensure_arena(size_t bytes, Clock::time_point deadline, const Describe& what,
                    ProgressStatus* status);
  SharedWindow allocate_window(MPI_Comm comm, size_t bytes);
  void release_own_pages(const SharedWindow& window) const;
  void free_window(SharedWindow& window);
  // The inter-node stage of one owned slice. Returns true when it also stored the result
  // into every buffer of `also_out` (3LC does, from its final decode); otherwise the
  // caller copies. `node_inputs` (3LC, float32): the slice is not reduced yet, 3LC sums
  // these node buffers itself.
  bool inter_node(int slice, char* data, size_t elems, DType dtype, ReduceOp op, double divisor,
                  const InterNode& inter, size_t* residual_offset, size_t* owner_offset,
                  Clock::time_point deadline, const Describe& what, ProgressStatus* status,
                  const std::vector<void*>* also_out, const float* const* node_inputs = nullptr,
                  int n_node_inputs = 0);

  Transport& world_;
  MPI_Comm node_comm_ = MPI_COMM_NULL;  // control and arena windows (collective thread)
  MPI_Comm pool_comm_ = MPI_COMM_NULL;  // pool windows (caller of shared_alloc)
  int local_rank_ = 0;
  int local_size_ = 1;
  int node_count_ = 1;
  int slices_ = 1;  // P: the largest node's rank count
  std::vector<int> world_of_local_;

  // Per slice s owned here: a transport over the ranks owning s on every node.
  std::vector<std::unique_ptr<Transport>> slice_transports_;
  std::vector<std::unique_ptr<RingAllreduce>> slice_rings_;
  std::vector<std::unique_ptr<CompressedAllreduce>> slice_compressed_;

  SharedWindow control_;
  std::vector<std::atomic<uint64_t>*> flags_;  // by local rank
  // Epoch of the sync after which the rank reports an agreed failure (3LC found NaN/Inf in
  // the slice it owns): the node's other ranks raise the same error instead of waiting.
  std::vector<std::atomic<uint64_t>*> failed_;
  std::vector<std::atomic<uint64_t>*> nonfinite_;  // epoch of the sync after a non-finite slice
  uint64_t epoch_ = 0;
  SharedWindow arena_;
  size_t arena_bytes_ = 0;

  mutable std::mutex pool_mu_;
  std::vector<SharedWindow> pools_;
  std::vector<size_t> pool_used_;

  std::atomic<bool> aborted_{false};
  bool healthy_ = true;  // false after a failed sync: peers may never free windows with us
  std::atomic<uint64_t> shm_bytes_{0};
};

}  // namespace pbm
