// What a collective call asks for, independent of how it is executed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "../common/dtype.h"

namespace pbm {

enum class CollectiveKind : int32_t { kAllreduce = 0, kBroadcast = 1, kBarrier = 2 };

// Allreduce algorithms. Each lives in its own file with the same run() shape.
enum class Algorithm : int32_t {
  kRing = 0,  // ring_allreduce.cpp: pipelined reduce-scatter + allgather over point-to-point
  kMpi = 1,   // mpi_allreduce.cpp: the MPI library's own MPI_Iallreduce (baseline, fallback)
  kShm = 2,   // shm_allreduce.cpp: one node, reduce-scatter + allgather in shared memory
  kHierarchical = 3,  // shm_allreduce.cpp: shm node stage + per-slice rings between nodes
  kAuto = 4,  // engine.cpp resolve_algorithm(): by message size and topology
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
  }
  return "unknown";
}

struct CollectiveSpec {
  CollectiveKind kind = CollectiveKind::kAllreduce;
  Algorithm algorithm = Algorithm::kRing;
  ReduceOp op = ReduceOp::kSum;
  DType dtype = DType::kFloat32;
  void* data = nullptr;  // in place: input on entry, result on exit
  size_t count = 0;      // elements
  int root = 0;          // broadcast only
  std::string name;      // tensor name for messages; may be empty
  // 16-bit floats travel as 16-bit (each hop adds in float32 and rounds once) instead of
  // being widened to float32 for the whole collective: Cast compression.
  bool half_wire = false;
  // 3LC compression (allreduce sum/avg of float32/bfloat16/float16 only).
  bool threelc = false;
  float sparsity = 1.0f;
  float* residual = nullptr;        // float32 x count, first-stage error feedback
  float* owner_residual = nullptr;  // float32 x this rank's partition, second stage
  // Report whether every element of the result is finite (Operation::finite). The zero-copy
  // shared-memory stage computes it inside its reduce pass for free; other paths scan the
  // result once afterwards.
  bool check_finite = false;
};

}  // namespace pbm
