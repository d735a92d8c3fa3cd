#include "ring_allreduce.h"

#include <algorithm>
#include <climits>
#include <vector>

#include "../kernels/reduce.h"

namespace pbm {

namespace {
constexpr size_t kScratchRing = 2;  // transport scratch slot holding the receive window
// Allgather messages go straight into the result buffer; they are only cut to stay below
// MPI's int count limit.
constexpr size_t kMaxMessageBytes = size_t{1} << 30;
}  // namespace

RingAllreduce::RingAllreduce(Transport& transport) : transport_(transport) {}

void RingAllreduce::run(void* data_void, size_t count, DType dtype, ReduceOp op, double divisor,
                        Clock::time_point deadline, const Describe& what,
                        ProgressStatus* status) {
  const int n = transport_.size();
  const int r = transport_.rank();
  char* data = static_cast<char*>(data_void);
  const size_t esize = dtype_size(dtype);
  if (n == 1 || count == 0) {
    if (divisor != 1.0) divide_in_place(data, count, dtype, divisor);
    return;
  }
  // Segment s covers [begin(s), begin(s+1)): sizes differ by at most one element, so any
  // count works, including fewer elements than ranks (some segments are then empty).
  auto begin = [&](int s) {
    return (count / n) * static_cast<size_t>(s) + std::min<size_t>(s, count % n);
  };
  auto seg_count = [&](int s) { return begin(s + 1) - begin(s); };
  auto mod = [n](int x) { return ((x % n) + n) % n; };

  // Reduce-scatter: at step k, send segment r-k (complete up to this rank's contribution)
  // to the right and reduce segment r-k-1 arriving from the left into the local buffer.
  // After n-1 steps this rank holds the full reduction of segment r+1.
  for (int step = 0; step < n - 1; ++step) {
    const int send_seg = mod(r - step);
    const int recv_seg = mod(r - step - 1);
    reduce_scatter_step(data, esize, dtype, op, begin(send_seg), seg_count(send_seg),
                        begin(recv_seg), seg_count(recv_seg), deadline,
                        [&] { return what() + ": ring reduce-scatter step " + std::to_string(step); },
                        status);
  }
  const int owned = mod(r + 1);
  if (divisor != 1.0) divide_in_place(data + begin(owned) * esize, seg_count(owned), dtype, divisor);

  // Allgather: at step k, pass segment r+1-k (owned, or received at step k-1) to the right
  // and receive segment r-k from the left straight into its final place.
  for (int step = 0; step < n - 1; ++step) {
    const int send_seg = mod(r + 1 - step);
    const int recv_seg = mod(r - step);
    allgather_step(data, esize, begin(send_seg), seg_count(send_seg), begin(recv_seg),
                   seg_count(recv_seg), deadline,
                   [&] { return what() + ": ring allgather step " + std::to_string(step); }, status);
  }
}

void RingAllreduce::reduce_scatter_step(char* data, size_t esize, DType dtype, ReduceOp op,
                                        size_t send_begin, size_t send_count, size_t recv_begin,
                                        size_t recv_count, Clock::time_point deadline,
                                        const Describe& what, ProgressStatus* status) {
  const int n = transport_.size();
  const int r = transport_.rank();
  const int left = (r - 1 + n) % n;
  const int right = (r + 1) % n;
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
    transport_.check(MPI_Isend(data + (send_begin + first) * esize, static_cast<int>(elems * esize),
                               MPI_BYTE, right, kTagRing, transport_.comm(), &sends[c]),
                     "MPI_Isend (ring)");
    transport_.bytes_sent += elems * esize;
  }

  // Keep `window` receives in flight; reduce piece c while pieces c+1.. arrive.
  std::vector<MPI_Request> recvs(window_slots, MPI_REQUEST_NULL);
  auto post_recv = [&](size_t c) {
    const size_t elems = std::min(chunk_elems, recv_count - c * chunk_elems);
    const size_t slot = c % window_slots;
    transport_.check(MPI_Irecv(window_buffer + slot * chunk_elems * esize,
                               static_cast<int>(elems * esize), MPI_BYTE, left, kTagRing,
                               transport_.comm(), &recvs[slot]),
                     "MPI_Irecv (ring)");
  };
  for (size_t c = 0; c < std::min<size_t>(recv_chunks, window_slots); ++c) post_recv(c);
  for (size_t c = 0; c < recv_chunks; ++c) {
    const size_t slot = c % window_slots;
    transport_.wait_one(recvs[slot], left, true, deadline, what, status);
    const size_t first = c * chunk_elems;
    const size_t elems = std::min(chunk_elems, recv_count - first);
    reduce_into(data + (recv_begin + first) * esize, window_buffer + slot * chunk_elems * esize,
                elems, dtype, op);
    if (c + window_slots < recv_chunks) post_recv(c + window_slots);
  }
  std::vector<int> peers(sends.size(), right);
  std::vector<bool> is_recv(sends.size(), false);
  transport_.wait_all(sends, peers, is_recv, deadline, what, status);
}

void RingAllreduce::allgather_step(char* data, size_t esize, size_t send_begin, size_t send_count,
                                   size_t recv_begin, size_t recv_count,
                                   Clock::time_point deadline, const Describe& what,
                                   ProgressStatus* status) {
  const int n = transport_.size();
  const int r = transport_.rank();
  const int left = (r - 1 + n) % n;
  const int right = (r + 1) % n;
  const size_t piece_elems = std::max<size_t>(1, kMaxMessageBytes / esize);
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  std::vector<bool> is_recv;
  for (size_t first = 0; first < recv_count; first += piece_elems) {
    const size_t elems = std::min(piece_elems, recv_count - first);
    requests.emplace_back();
    transport_.check(MPI_Irecv(data + (recv_begin + first) * esize, static_cast<int>(elems * esize),
                               MPI_BYTE, left, kTagRing, transport_.comm(), &requests.back()),
                     "MPI_Irecv (ring)");
    peers.push_back(left);
    is_recv.push_back(true);
  }
  for (size_t first = 0; first < send_count; first += piece_elems) {
    const size_t elems = std::min(piece_elems, send_count - first);
    requests.emplace_back();
    transport_.check(MPI_Isend(data + (send_begin + first) * esize, static_cast<int>(elems * esize),
                               MPI_BYTE, right, kTagRing, transport_.comm(), &requests.back()),
                     "MPI_Isend (ring)");
    transport_.bytes_sent += elems * esize;
    peers.push_back(right);
    is_recv.push_back(false);
  }
  transport_.wait_all(requests, peers, is_recv, deadline, what, status);
}

}  // namespace pbm
