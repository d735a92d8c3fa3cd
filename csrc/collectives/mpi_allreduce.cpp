#include "mpi_allreduce.h"

#include <algorithm>
#include <vector>

#include "../kernels/reduce.h"

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

AllreduceResult MpiAllreduce::run(const AllreduceArgs& args, const Progress& progress) {
  char* bytes = static_cast<char*>(args.data);
  const size_t esize = dtype_size(args.dtype);
  const Progress phase(progress, "MPI_Iallreduce");
  for (size_t first = 0; first < args.count; first += kMaxElemsPerCall) {
    const size_t elems = std::min(kMaxElemsPerCall, args.count - first);
    MPI_Request request = MPI_REQUEST_NULL;
    transport_.check(MPI_Iallreduce(MPI_IN_PLACE, bytes + first * esize, static_cast<int>(elems),
                                    mpi_type(args.dtype), mpi_op(args.op), transport_.comm(), &request),
                     "MPI_Iallreduce");
    transport_.bytes_sent += elems * esize * 2 * (transport_.size() - 1) / transport_.size();
    // A non-blocking collective cannot say which peer is late: report all others.
    std::vector<MPI_Request> requests{request};
    const std::vector<int> others = everyone_but(transport_);
    std::vector<int> peers{others.empty() ? transport_.rank() : others.front()};
    transport_.wait_all(requests, peers, {false}, phase, /*cancellable=*/false);
  }
  if (args.divisor != 1.0) divide_in_place(args.data, args.count, args.dtype, args.divisor);
  return {};
}

void mpi_broadcast(Transport& transport, void* data, size_t bytes, int root, const Progress& progress) {
  char* base = static_cast<char*>(data);
  const Progress phase(progress, "MPI_Ibcast");
  for (size_t first = 0; first < bytes; first += kMaxElemsPerCall) {
    const size_t piece = std::min(kMaxElemsPerCall, bytes - first);
    MPI_Request request = MPI_REQUEST_NULL;
    transport.check(MPI_Ibcast(base + first, static_cast<int>(piece), MPI_BYTE, root,
                               transport.comm(), &request),
                    "MPI_Ibcast");
    if (transport.rank() == root) transport.bytes_sent += piece;
    std::vector<MPI_Request> requests{request};
    transport.wait_all(requests, {root}, {false}, phase, /*cancellable=*/false);
  }
}

}  // namespace pbm
