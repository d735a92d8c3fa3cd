// Pipelined ring allreduce: reduce-scatter then allgather around the ring of ranks
// (REFERENCE.md section 3). Each rank sends and receives 2(n-1)/n of the buffer, which is
// bandwidth-optimal.
#pragma once

#include <cstddef>
#include <string>

#include "../common/dtype.h"
#include "transport.h"

namespace pbm {

class RingAllreduce {
 public:
  explicit RingAllreduce(Transport& transport);

  // Reduces `data` (count elements of a wide dtype: float32/64, int32/64) in place across
  // all ranks. `divisor` > 1 divides the result (kAvg); it is applied to the one segment
  // each rank owns between the two phases, so the division costs 1/n of a pass.
  void run(void* data, size_t count, DType dtype, ReduceOp op, double divisor,
           Clock::time_point deadline, const Describe& what, ProgressStatus* status);

  // Size of the pieces a segment is cut into during reduce-scatter. Small enough that the
  // received piece is still in cache when it is reduced (so the reduce reads it for free),
  // large enough that per-message overhead stays a few percent. PBM_RING_CHUNK_BYTES.
  size_t chunk_bytes = 256 * 1024;
  // Receives kept in flight during reduce-scatter: the next pieces arrive while the
  // current one is reduced.
  int window = 4;

 private:
  void reduce_scatter_step(char* data, size_t esize, DType dtype, ReduceOp op, size_t send_begin,
                           size_t send_count, size_t recv_begin, size_t recv_count,
                           Clock::time_point deadline, const Describe& what,
                           ProgressStatus* status);
  void allgather_step(char* data, size_t esize, size_t send_begin, size_t send_count,
                      size_t recv_begin, size_t recv_count, Clock::time_point deadline,
                      const Describe& what, ProgressStatus* status);

  Transport& transport_;
};

}  // namespace pbm
