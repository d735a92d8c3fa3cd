// The one interface of the allreduce algorithms (ring, MPI, inline, 3LC, shm, hierarchical).
//
// A call is described once, by AllreduceArgs (in the spirit of Gloo's AllreduceOptions):
// the buffer, what to reduce and how it travels (Wire: plain, 16-bit, 3LC with its state).
// The engine resolves the requested algorithm once (algorithm_table.h), fills in the
// resolved fields (the divisor of an average, the agreed zero-copy placement, the bound 3LC
// residuals), and calls run(args, progress) of the implementation its table picked: the
// first whose enabled(args) holds.
//
// The engine does the work every algorithm shares, around run(): the join (which the
// algorithm may ask to carry its payload or to agree on a zero-copy placement), widening
// 16-bit floats to a float32 copy for algorithms that reduce whole buffers in float32
// (and narrowing the result back), and the finiteness scan when run() did not check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "../common/dtype.h"
#include "collective.h"
#include "progress.h"
#include "shared_pool.h"
#include "threelc_state.h"

namespace pbm {

// How an allreduce's values travel between ranks: what a compression codec asks of the core
// (pybrain_mpi/compression: each codec's wire()).
enum class WireKind : int32_t {
  kPlain = 0,    // the buffer's own dtype (16-bit floats widened to float32 on most paths)
  kHalf = 1,     // 16-bit floats stay 16-bit on the wire: each hop adds in float32, rounds once
  kThreeLC = 2,  // the two-stage 3LC-compressed allreduce with error feedback
};

struct Wire {
  WireKind kind = WireKind::kPlain;
  DType half_dtype = DType::kBFloat16;   // kHalf: the 16-bit dtype the caller's buffer is cast to
  float sparsity = 1.0f;                 // kThreeLC: the multiplier s in [1, 2)
  std::shared_ptr<ThreeLCState> state;   // kThreeLC: the tensor's error-feedback state
  uint32_t block = 0;                    // kThreeLC: one scale per block of this many elements (0: per tensor)
  bool threelc() const { return kind == WireKind::kThreeLC; }
};

struct CollectiveHeader;  // handshake.h

struct AllreduceArgs {
  // --- what the caller asks for ---
  void* data = nullptr;  // in place: input on entry, result on exit
  size_t count = 0;      // elements
  DType dtype = DType::kFloat32;
  ReduceOp op = ReduceOp::kSum;
  Algorithm algorithm = Algorithm::kRing;  // requested; the engine overwrites it with the resolved one
  std::string name;                        // tensor name for messages; may be empty
  Wire wire;
  // Report whether every element of the result is finite (AllreduceResult::finite).
  bool check_finite = false;
  // The caller's own description of the call (e.g. a hash of its shape and original dtype),
  // compared across ranks like the rest of the header: a difference is a mismatch. 0: none.
  uint64_t signature = 0;

  // --- resolved by the engine before run(); algorithms only read these ---
  double divisor = 1.0;         // avg: the world size (each algorithm divides where it is cheapest)
  ZeroCopyPlacement placement;  // node-stage algorithms that asked for it in their JoinRequest
  ThreeLCResiduals residuals;   // 3LC: the state's buffers for the resolved path's layout
  const CollectiveHeader* header = nullptr;  // the call's join header (algorithms that join by themselves)

  size_t bytes() const { return count * dtype_size(dtype); }
  bool half_wire() const { return wire.kind == WireKind::kHalf; }
};

// What the join step carries for an algorithm (engine.cpp).
struct JoinRequest {
  bool payload = false;    // the whole buffer rides in the join message (tiny allreduces)
  bool zero_copy = false;  // agree on a zero-copy placement of the node's buffers
  bool self_joined = false;  // no join message: run() agrees on args.header itself (small_allreduce.h)
};

struct AllreduceResult {
  bool finite_known = false;  // run() checked finiteness itself, inside its reduce
  bool finite = true;
  // A self-joining algorithm (JoinRequest::self_joined) found that the ranks proposed
  // collectives of different names; nothing moved, on every rank alike: negotiate first.
  bool negotiate = false;
  // A self-joining algorithm found a peer in a collective that joins by message (a different
  // call, submitted in another order): it withdrew its own share, nothing moved; the engine
  // joins by message instead, so the ranks see each other's names and negotiate.
  bool join_instead = false;
};

class AllreduceAlgorithm {
 public:
  virtual ~AllreduceAlgorithm() = default;
  virtual const char* name() const = 0;

  // Whether this implementation runs `args` (with args.algorithm resolved).
  virtual bool enabled(const AllreduceArgs& args) const = 0;
  // Whether 16-bit floats are reduced in a float32 copy (the engine widens and narrows).
  virtual bool widens(const AllreduceArgs& args) const { return false; }
  virtual JoinRequest join(const AllreduceArgs& args) const { return {}; }
  // 3LC paths: this rank's residual layout for `args` (the engine binds the state with it).
  // None when the path keeps no 3LC state (no wire compression, or nothing compressed).
  virtual std::optional<ThreeLCLayout> threelc_layout(const AllreduceArgs& args) const { return std::nullopt; }

  // Reduces args.data in place on every rank. Runs after the join, with every rank's
  // header agreed; every wait is bounded by the progress's deadline.
  virtual AllreduceResult run(const AllreduceArgs& args, const Progress& progress) = 0;

  // Algorithms with transports of their own (the hierarchical slice rings).
  virtual void abort() {}
  virtual uint64_t bytes_sent() const { return 0; }
};

// 16-bit floats of a plain wire accumulate in a float32 copy on whole-buffer algorithms;
// a 16-bit wire keeps them (each hop adds in float32 and rounds once).
inline bool widens_half(const AllreduceArgs& args) {
  return is_half_precision(args.dtype) && !args.half_wire();
}

}  // namespace pbm
