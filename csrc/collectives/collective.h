// The kinds of collective and the allreduce algorithms a caller can ask for.
#pragma once

#include <cstdint>

namespace pbm {

enum class CollectiveKind : int32_t { kAllreduce = 0, kBroadcast = 1, kBarrier = 2 };

// Allreduce algorithms a caller asks for. The engine resolves kAuto (and kHierarchical on
// topologies where it degenerates) once per call, then picks the implementation from its
// table (algorithm_table.h); each implementation lives in its own file.
enum class Algorithm : int32_t {
  kRing = 0,          // ring_allreduce.cpp: pipelined reduce-scatter + allgather over point-to-point
  kMpi = 1,           // mpi_allreduce.cpp: the MPI library's own MPI_Iallreduce (baseline, fallback)
  kShm = 2,           // shm_allreduce.cpp: one node, reduce-scatter + allgather in shared memory
  kHierarchical = 3,  // hierarchical_allreduce.cpp: shm node stage + per-slice rings between nodes
  kAuto = 4,          // algorithm_table.cpp resolve(): by message size and topology
  kSmall = 5,         // small_allreduce.cpp: one node, small messages through flagged shared slots
};

inline const char* collective_kind_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllreduce: return "allreduce";
    case CollectiveKind::kBroadcast: return "broadcast";
    case CollectiveKind::kBarrier: return "barrier";
  }
  return "unknown";
}

inline const char* algorithm_name(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::kRing: return "ring";
    case Algorithm::kMpi: return "mpi";
    case Algorithm::kShm: return "shm";
    case Algorithm::kHierarchical: return "hierarchical";
    case Algorithm::kAuto: return "auto";
    case Algorithm::kSmall: return "small";
  }
  return "unknown";
}

}  // namespace pbm
