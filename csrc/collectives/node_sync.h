// Synchronisation of the ranks of one node, for the shared-memory node stage.
//
// Each rank owns one cache line of a shared control window (no false sharing) holding
// three std::atomic<uint64_t>: its sync counter and two flags. wait() is a sequence-numbered
// barrier: every node rank runs the same collectives with the same number of syncs in each,
// so sync number e is the same point on all of them. A rank publishes e with release
// semantics and spins (then yields) until every peer's counter reached e (acquire): what a
// peer wrote to shared memory before its sync is visible after ours.
//
// Every wait has the collective's deadline: a rank that never arrives (crashed, stopped,
// or in another collective) is named, as its world rank, with the phase it left the others
// in, in a CollectiveTimeoutError. Nothing here waits without a deadline.
//
// The flags travel with a sync: a rank sets one to the number of its *next* sync, so every
// node rank reads the same answer right after that sync, and a flag from an earlier
// collective never matches:
//   failure    3LC found NaN/Inf in the inter-node stage of a slice this rank owns: the
//              node's other ranks raise the same agreed error instead of waiting for data;
//   nonfinite  a slice this rank reduced holds Inf/NaN (check_finite on the zero-copy path).
// A node of one rank has nobody to wait for: wait() returns at once and the flags read
// "none" (the lone rank knows its own outcome).
#pragma once

#include <mpi.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "progress.h"
#include "shared_pool.h"
#include "transport.h"

namespace pbm {

class NodeSync {
 public:
  // Collective over `node_comm`. `world_of_local`: world rank of each node rank.
  NodeSync(const Transport& world, MPI_Comm node_comm, int local_rank, const std::vector<int>& world_of_local);

  // Returns once every node rank reached this sync; `phase` names it in errors
  // ("shared-memory <phase> timed out; waiting for node rank 3").
  void wait(const char* phase, const Progress& progress);

  // Flags published with this rank's next wait().
  void flag_failure();
  void flag_nonfinite();
  // After a wait(): the first node rank (local rank) that flagged a failure with it, or -1.
  int failed_rank() const;
  // After a wait(): whether any node rank flagged a non-finite slice with it.
  bool nonfinite() const;

  // Gives up every wait at once (engine shutdown).
  void abort() { aborted_.store(true); }

 private:
  [[noreturn]] void time_out(const char* phase, const std::vector<int>& missing, bool aborted,
                             const Progress& progress) const;

  const Transport& world_;
  int local_rank_;
  int local_size_;
  std::vector<int> world_of_local_;
  SharedWindow control_;  // mapped for the engine's life (see shared_pool.h)
  std::vector<std::atomic<uint64_t>*> counter_;    // by local rank
  std::vector<std::atomic<uint64_t>*> failed_;     // by local rank: sync number of a failure
  std::vector<std::atomic<uint64_t>*> nonfinite_;  // by local rank: sync number of a non-finite slice
  uint64_t epoch_ = 0;                             // syncs so far (the same on every node rank)
  std::atomic<bool> aborted_{false};
};

}  // namespace pbm
