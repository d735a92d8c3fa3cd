// The MPI library's own collectives, started non-blocking and polled against a deadline
// like everything else. MPI_Iallreduce is the "mpi" algorithm: the baseline our ring is
// measured against, and a fallback on interconnects where the library knows better.
#pragma once

#include <cstddef>
#include <string>

#include "../common/dtype.h"
#include "transport.h"

namespace pbm {

// In-place MPI_Iallreduce on a wide dtype; kAvg reduces as a sum (the caller divides).
void mpi_allreduce(Transport& transport, void* data, size_t count, DType dtype, ReduceOp op,
                   Clock::time_point deadline, const Describe& what, ProgressStatus* status);

// MPI_Ibcast of `bytes` bytes from `root`.
void mpi_broadcast(Transport& transport, void* data, size_t bytes, int root,
                   Clock::time_point deadline, const Describe& what, ProgressStatus* status);

}  // namespace pbm
