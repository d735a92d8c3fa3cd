#include "mpi_allreduce.h"

#include <algorithm>
#include <vector>

namespace pbm {

namespace {
MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return MPI_FLOAT;
    case DType::kFloat64: return MPI_DOUBLE;
    case DType::kInt32: return MPI_INT32_T;
    case DType::kInt64: return MPI_INT64_T;
    default: break;
  }
  throw PbmError(std::string("MPI allreduce got unwidened dtype ") + dtype_name(dtype));
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return MPI_SUM;
    case ReduceOp::kMin: return MPI_MIN;
    case ReduceOp::kMax: return MPI_MAX;
  }
  return MPI_SUM;
}

// MPI counts are ints: collectives over more elements run in pieces.
constexpr size_t kMaxElemsPerCall = size_t{1} << 30;

std::vector<int> everyone_but(const Transport& transport) {
  std::vector<int> ranks;
  for (int r = 0; r < transport.size(); ++r)
    if (r != transport.rank()) ranks.push_back(r);
  return ranks;
}
}  // namespace

void mpi_allreduce(Transport& transport, void* data, size_t count, DType dtype, ReduceOp op,
                   Clock::time_point deadline, const Describe& what, ProgressStatus* status) {
  char* bytes = static_cast<char*>(data);
  const size_t esize = dtype_size(dtype);
  for (size_t first = 0; first < count; first += kMaxElemsPerCall) {
    const size_t elems = std::min(kMaxElemsPerCall, count - first);
    MPI_Request request = MPI_REQUEST_NULL;
    transport.check(MPI_Iallreduce(MPI_IN_PLACE, bytes + first * esize, static_cast<int>(elems),
                                   mpi_type(dtype), mpi_op(op), transport.comm(), &request),
                    "MPI_Iallreduce");
    transport.bytes_sent += elems * esize * 2 * (transport.size() - 1) / transport.size();
    // A non-blocking collective cannot say which peer is late: report all others.
    std::vector<MPI_Request> requests{request};
    const std::vector<int> others = everyone_but(transport);
    std::vector<int> peers{others.empty() ? transport.rank() : others.front()};
    transport.wait_all(requests, peers, {false}, deadline, [&] { return what() + ": MPI_Iallreduce"; }, status,
                       /*cancellable=*/false);
  }
}

void mpi_broadcast(Transport& transport, void* data, size_t bytes, int root,
                   Clock::time_point deadline, const Describe& what, ProgressStatus* status) {
  char* base = static_cast<char*>(data);
  for (size_t first = 0; first < bytes; first += kMaxElemsPerCall) {
    const size_t piece = std::min(kMaxElemsPerCall, bytes - first);
    MPI_Request request = MPI_REQUEST_NULL;
    transport.check(MPI_Ibcast(base + first, static_cast<int>(piece), MPI_BYTE, root,
                               transport.comm(), &request),
                    "MPI_Ibcast");
    if (transport.rank() == root) transport.bytes_sent += piece;
    std::vector<MPI_Request> requests{request};
    transport.wait_all(requests, {root}, {false}, deadline, [&] { return what() + ": MPI_Ibcast"; }, status,
                       /*cancellable=*/false);
  }
}

}  // namespace pbm
