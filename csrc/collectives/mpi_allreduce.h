// The MPI library's own collectives, started non-blocking and polled against a deadline
// like everything else. MPI_Iallreduce is the "mpi" algorithm: the baseline our ring is
// measured against, and a fallback on interconnects where the library knows better.
#pragma once

#include <cstddef>

#include "allreduce.h"
#include "transport.h"

namespace pbm {

class MpiAllreduce : public AllreduceAlgorithm {
 public:
  explicit MpiAllreduce(Transport& transport) : transport_(transport) {}

  const char* name() const override { return "mpi"; }
  bool enabled(const AllreduceArgs& args) const override {
    return args.algorithm == Algorithm::kMpi && !args.wire.threelc();
  }
  // MPI reduces wide types only: 16-bit floats always go through a float32 copy.
  bool widens(const AllreduceArgs& args) const override { return is_half_precision(args.dtype); }
  // In-place MPI_Iallreduce; kAvg reduces as a sum and is divided afterwards.
  AllreduceResult run(const AllreduceArgs& args, const Progress& progress) override;

 private:
  Transport& transport_;
};

// MPI_Ibcast of `bytes` bytes from `root`.
void mpi_broadcast(Transport& transport, void* data, size_t bytes, int root, const Progress& progress);

}  // namespace pbm
