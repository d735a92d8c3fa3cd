#include "ring_allreduce.h"

#include <algorithm>
#include <climits>
#include <vector>

#include "../common/partition.h"
#include "../kernels/reduce.h"

namespace pbm {

namespace {
// Allgather messages go straight into the result buffer; they are only cut to stay below
// MPI's int count limit.
constexpr size_t kMaxMessageBytes = size_t{1} << 30;
}  // namespace

struct RingAllreduce::Pass {
  char* data;
  size_t esize;
  DType dtype;
  ReduceOp op;
  Partition segments;  // segment s is reduced by rank s - 1 (mod n), then passed on
  int left;
  int right;
};

RingAllreduce::RingAllreduce(Transport& transport) : transport_(transport) {}

AllreduceResult RingAllreduce::run(const AllreduceArgs& args, const Progress& progress) {
  reduce(MutableElements{args.data, args.count, args.dtype}, args.op, args.divisor, progress);
  return {};
}

void RingAllreduce::reduce(const MutableElements& buffer, ReduceOp op, double divisor, const Progress& progress) {
  const int n = transport_.size();
  const int r = transport_.rank();
  char* data = static_cast<char*>(buffer.data);
  const size_t esize = dtype_size(buffer.dtype);
  if (n == 1 || buffer.count == 0) {
    if (divisor != 1.0) divide_in_place(data, buffer.count, buffer.dtype, divisor);
    return;
  }
  // Segments differ by at most one element, so any count works, including fewer elements
  // than ranks (some segments are then empty).
  const Pass pass{data, esize, buffer.dtype, op, Partition::even(buffer.count, n), (r - 1 + n) % n, (r + 1) % n};
  auto mod = [n](int x) { return ((x % n) + n) % n; };

  // Reduce-scatter: at step k, send segment r-k (complete up to this rank's contribution)
  // to the right and reduce segment r-k-1 arriving from the left into the local buffer.
  // After n-1 steps this rank holds the full reduction of segment r+1.
  for (int step = 0; step < n - 1; ++step) {
    reduce_scatter_step(pass, mod(r - step), mod(r - step - 1),
                        Progress(progress, "ring reduce-scatter step", step));
  }
  // Averages divide the one segment this rank finished: 1/n of a pass.
  const int owned = mod(r + 1);
  if (divisor != 1.0) {
    divide_in_place(data + pass.segments.begin(owned) * esize, pass.segments.length(owned), buffer.dtype, divisor);
  }

  // Allgather: at step k, pass segment r+1-k (owned, or received at step k-1) to the right
  // and receive segment r-k from the left straight into its final place.
  for (int step = 0; step < n - 1; ++step) {
    allgather_step(pass, mod(r + 1 - step), mod(r - step), Progress(progress, "ring allgather step", step));
  }
}

void RingAllreduce::reduce_scatter_step(const Pass& pass, int send_segment, int recv_segment,
                                        const Progress& progress) {
  const size_t esize = pass.esize;
  const size_t send_begin = pass.segments.begin(send_segment);
  const size_t send_count = pass.segments.length(send_segment);
  const size_t recv_begin = pass.segments.begin(recv_segment);
  const size_t recv_count = pass.segments.length(recv_segment);
  const size_t chunk_elems = std::max<size_t>(1, std::min(chunk_bytes, kMaxMessageBytes) / esize);
  const size_t send_chunks = (send_count + chunk_elems - 1) / chunk_elems;
  const size_t recv_chunks = (recv_count + chunk_elems - 1) / chunk_elems;
  const int window_slots = std::max(1, window);
  char* window_buffer = transport_.scratch(kScratchRing, chunk_elems * esize * window_slots);

  // Post every send of the step at once: the data is final, and with single-copy (CMA)
  // transfers the receiver pulls each piece as soon as it posts the matching receive.
  std::vector<MPI_Request> sends(send_chunks, MPI_REQUEST_NULL);
  for (size_t c = 0; c < send_chunks; ++c) {
    const size_t first = c * chunk_elems;
    const size_t elems = std::min(chunk_elems, send_count - first);
    transport_.check(MPI_Isend(pass.data + (send_begin + first) * esize, static_cast<int>(elems * esize),
                               MPI_BYTE, pass.right, kTagRing, transport_.comm(), &sends[c]),
                     "MPI_Isend (ring)");
    transport_.bytes_sent += elems * esize;
  }

  // Keep `window` receives in flight; reduce piece c while pieces c+1.. arrive.
  std::vector<MPI_Request> recvs(window_slots, MPI_REQUEST_NULL);
  auto post_recv = [&](size_t c) {
    const size_t elems = std::min(chunk_elems, recv_count - c * chunk_elems);
    const size_t slot = c % window_slots;
    transport_.check(MPI_Irecv(window_buffer + slot * chunk_elems * esize,
                               static_cast<int>(elems * esize), MPI_BYTE, pass.left, kTagRing,
                               transport_.comm(), &recvs[slot]),
                     "MPI_Irecv (ring)");
  };
  for (size_t c = 0; c < std::min<size_t>(recv_chunks, window_slots); ++c) post_recv(c);
  for (size_t c = 0; c < recv_chunks; ++c) {
    const size_t slot = c % window_slots;
    transport_.wait_one(recvs[slot], pass.left, true, progress);
    const size_t first = c * chunk_elems;
    const size_t elems = std::min(chunk_elems, recv_count - first);
    reduce_into(pass.data + (recv_begin + first) * esize, window_buffer + slot * chunk_elems * esize,
                elems, pass.dtype, pass.op);
    if (c + window_slots < recv_chunks) post_recv(c + window_slots);
  }
  std::vector<int> peers(sends.size(), pass.right);
  std::vector<bool> is_recv(sends.size(), false);
  transport_.wait_all(sends, peers, is_recv, progress);
}

void RingAllreduce::allgather_step(const Pass& pass, int send_segment, int recv_segment,
                                   const Progress& progress) {
  const size_t esize = pass.esize;
  const size_t piece_elems = std::max<size_t>(1, kMaxMessageBytes / esize);
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  std::vector<bool> is_recv;
  auto post = [&](bool recv, int segment) {
    const size_t begin = pass.segments.begin(segment);
    const size_t count = pass.segments.length(segment);
    for (size_t first = 0; first < count; first += piece_elems) {
      const size_t elems = std::min(piece_elems, count - first);
      char* at = pass.data + (begin + first) * esize;
      const int bytes = static_cast<int>(elems * esize);
      requests.emplace_back();
      if (recv) {
        transport_.check(MPI_Irecv(at, bytes, MPI_BYTE, pass.left, kTagRing, transport_.comm(), &requests.back()),
                         "MPI_Irecv (ring)");
      } else {
        transport_.check(MPI_Isend(at, bytes, MPI_BYTE, pass.right, kTagRing, transport_.comm(), &requests.back()),
                         "MPI_Isend (ring)");
        transport_.bytes_sent += elems * esize;
      }
      peers.push_back(recv ? pass.left : pass.right);
      is_recv.push_back(recv);
    }
  };
  post(true, recv_segment);  // receives first, so the data lands in place
  post(false, send_segment);
  transport_.wait_all(requests, peers, is_recv, progress);
}

}  // namespace pbm
