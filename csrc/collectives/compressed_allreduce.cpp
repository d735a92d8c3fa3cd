#include "compressed_allreduce.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <vector>

#include "../compression/threelc.h"
#include "../kernels/reduce.h"

namespace pbm {

namespace {
// Transport scratch slots (the handshake uses 0-1, the ring 2, the engine 3-4).
constexpr size_t kScratchSend = 5;
constexpr size_t kScratchRecv = 6;
constexpr size_t kScratchSum = 7;
constexpr int kTagCompressed = 17010;

// Precedes every encoded partition on the wire.
struct PartHeader {
  float scale = 0.f;
  uint32_t bytes = 0;
  uint32_t failed = 0;  // the sender's gradient had a NaN/Inf: nothing was encoded
  uint32_t reserved = 0;
};

size_t slot_bytes(size_t elements) { return sizeof(PartHeader) + threelc_max_encoded_bytes(elements); }

// A peer's message claiming a body larger than the slot can hold is corrupt: refuse it
// rather than decode past the buffer.
void check_body_fits(const PartHeader& header, size_t slot, int me, int peer, const Describe& what) {
  if (header.bytes > slot - sizeof(PartHeader)) {
    throw PbmError("rank " + std::to_string(me) + ": " + what() + ": rank " + std::to_string(peer) +
                   " sent a 3LC partition larger than possible (corrupt message)");
  }
}
}  // namespace

void CompressedAllreduce::exchange(const std::function<std::pair<char*, size_t>(int)>& recv_slot,
                                   const std::function<std::pair<const char*, size_t>(int)>& send_slot,
                                   Clock::time_point deadline, const Describe& what,
                                   ProgressStatus* status) {
  const int n = transport_.size();
  const int me = transport_.rank();
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  std::vector<bool> is_recv;
  for (int q = 0; q < n; ++q) {
    if (q == me) continue;
    const auto [buffer, capacity] = recv_slot(q);
    requests.emplace_back();
    transport_.check(MPI_Irecv(buffer, static_cast<int>(capacity), MPI_BYTE, q, kTagCompressed,
                               transport_.comm(), &requests.back()),
                     "MPI_Irecv (3LC)");
    peers.push_back(q);
    is_recv.push_back(true);
  }
  for (int q = 0; q < n; ++q) {
    if (q == me) continue;
    const auto [buffer, bytes] = send_slot(q);
    requests.emplace_back();
    // MPI_Isend takes a non-const pointer in MPI-2 headers; the buffer is only read.
    transport_.check(MPI_Isend(const_cast<char*>(buffer), static_cast<int>(bytes), MPI_BYTE, q,
                               kTagCompressed, transport_.comm(), &requests.back()),
                     "MPI_Isend (3LC)");
    transport_.bytes_sent += bytes;
    peers.push_back(q);
    is_recv.push_back(false);
  }
  transport_.wait_all(requests, peers, is_recv, deadline, what, status);
}

size_t CompressedAllreduce::partition_begin(size_t count, int parts, int index) {
  return (count / parts) * static_cast<size_t>(index) + std::min<size_t>(index, count % parts);
}

size_t CompressedAllreduce::partition_count(size_t count, int parts, int index) {
  return partition_begin(count, parts, index + 1) - partition_begin(count, parts, index);
}

void CompressedAllreduce::run(void* data_void, size_t count, DType dtype, bool average,
                              float sparsity, float* residual, float* owner_residual,
                              const std::string& name, Clock::time_point deadline,
                              const Describe& what, ProgressStatus* status, double divisor,
                              const std::vector<void*>* also_out, const float* const* node_inputs,
                              int n_node_inputs) {
  if (node_inputs != nullptr && dtype != DType::kFloat32)
    throw PbmError("3LC allreduce: node inputs are summed in float32 only, not " + std::string(dtype_name(dtype)));
  const int n = transport_.size();
  const int me = transport_.rank();
  char* data = static_cast<char*>(data_void);
  const size_t esize = dtype_size(dtype);
  auto begin = [&](int p) { return partition_begin(count, n, p); };
  auto elems = [&](int p) { return partition_count(count, n, p); };

  // Send buffer: one slot per partition, laid out back to back.
  std::vector<size_t> send_offset(n + 1, 0);
  for (int p = 0; p < n; ++p) send_offset[p + 1] = send_offset[p] + slot_bytes(elems(p));
  char* send = transport_.scratch(kScratchSend, send_offset[n]);

  // Step 1: encode every partition but our own with the first-stage residual. Our own
  // partition never crosses a wire: its exact sum with the residual goes straight into the
  // reduction (nothing is dropped, so its residual is delivered in full and cleared below).
  const size_t mine = elems(me);
  auto* sum = reinterpret_cast<float*>(transport_.scratch(kScratchSum, std::max<size_t>(mine, 1) * 4));
  // With node inputs (hierarchical, float32) `data` is not formed yet: our own partition is
  // summed from them straight into `sum`, the others into `data` while max|sum + residual|
  // is taken, so each encode skips its first pass.
  const bool fused = node_inputs != nullptr && n_node_inputs > 0;
  std::vector<const float*> at(fused ? n_node_inputs : 0);
  auto inputs_at = [&](size_t offset) {
    for (int q = 0; q < n_node_inputs; ++q) at[q] = node_inputs[q] + offset;
    return at.data();
  };
  std::string local_error;
  bool own_residual_nonzero = false;
  try {
    own_residual_nonzero =
        fused ? threelc_accumulate_n(inputs_at(begin(me)), n_node_inputs, mine, residual + begin(me), sum,
                                     name.c_str())
              : threelc_accumulate(data + begin(me) * esize, dtype, mine, residual + begin(me), sum,
                                   name.c_str());
  } catch (const PbmError& error) {
    local_error = error.what();
  }
  for (int p = 0; p < n && local_error.empty(); ++p) {
    auto* header = reinterpret_cast<PartHeader*>(send + send_offset[p]);
    *header = PartHeader{};
    if (p == me) continue;
    try {
      auto* body = reinterpret_cast<uint8_t*>(send + send_offset[p] + sizeof(PartHeader));
      float* part = reinterpret_cast<float*>(data) + begin(p);
      const ThreeLCEncoded encoded =
          fused ? threelc_encode_known_max(
                      part, elems(p), residual + begin(p), sparsity, body,
                      threelc_reduce_max(part, inputs_at(begin(p)), n_node_inputs, elems(p), residual + begin(p)),
                      name.c_str())
                : threelc_encode(data + begin(p) * esize, dtype, elems(p), residual + begin(p), sparsity,
                                 body, name.c_str());
      header->scale = encoded.scale;
      header->bytes = static_cast<uint32_t>(encoded.bytes);
    } catch (const PbmError& error) {
      local_error = error.what();
    }
  }
  if (!local_error.empty()) {
    for (int p = 0; p < n; ++p) {
      auto* header = reinterpret_cast<PartHeader*>(send + send_offset[p]);
      *header = PartHeader{};
      header->failed = 1;
    }
  }

  // Step 1 (wire): partition p goes to rank p; receive the n-1 peers' encodings of ours.
  const size_t my_slot = slot_bytes(elems(me));
  // Receive area: n slots of our partition (reused in step 4 for all partitions).
  size_t recv_bytes = my_slot * n;
  for (int p = 0; p < n; ++p) recv_bytes = std::max(recv_bytes, slot_bytes(elems(p)) * n);
  char* recv = transport_.scratch(kScratchRecv, recv_bytes);
  exchange(
      [&](int q) { return std::make_pair(recv + my_slot * q, my_slot); },
      [&](int p) {
        const auto* header = reinterpret_cast<const PartHeader*>(send + send_offset[p]);
        return std::make_pair(static_cast<const char*>(send + send_offset[p]),
                              sizeof(PartHeader) + header->bytes);
      },
      deadline, [&] { return what() + ": 3LC reduce-scatter"; }, status);
  std::memcpy(recv + my_slot * me, send + send_offset[me], my_slot);

  // Every rank sees every rank's flag for its partition: all agree on failure.
  std::vector<int> failed_ranks;
  for (int q = 0; q < n; ++q) {
    if (reinterpret_cast<const PartHeader*>(recv + my_slot * q)->failed) failed_ranks.push_back(q);
  }
  if (!failed_ranks.empty()) {
    std::ostringstream message;
    // World ranks (a hierarchical allreduce runs this over a sub-communicator per slice).
    message << "rank " << transport_.world_rank(me) << ": " << what()
            << ": 3LC found NaN/Inf in the gradient on rank";
    message << (failed_ranks.size() > 1 ? "s " : " ");
    for (size_t i = 0; i < failed_ranks.size(); ++i)
      message << (i ? ", " : "") << transport_.world_rank(failed_ranks[i]);
    message << "; no rank applied this allreduce";
    if (!local_error.empty()) message << " (here: " << local_error << ")";
    throw AgreedFailureError(message.str());
  }

  // Step 2: add the peers' encodings of our partition to our exact share, in rank order.
  if (own_residual_nonzero) std::fill(residual + begin(me), residual + begin(me) + mine, 0.f);
  for (int q = 0; q < n; ++q) {
    if (q == me) continue;
    const auto* header = reinterpret_cast<const PartHeader*>(recv + my_slot * q);
    check_body_fits(*header, my_slot, me, q, what);
    threelc_decode_add(reinterpret_cast<const uint8_t*>(recv + my_slot * q + sizeof(PartHeader)),
                       header->bytes, header->scale, mine, sum, DType::kFloat32, name.c_str());
  }
  if (average && n > 1) {
    const float inv = 1.0f / static_cast<float>(n);
    for (size_t i = 0; i < mine; ++i) sum[i] *= inv;
  }

  // Step 3: re-encode the reduced partition with the owner's residual.
  char* reduced = send;  // the step-1 send buffer is free again
  {
    auto* header = reinterpret_cast<PartHeader*>(reduced);
    *header = PartHeader{};
    const ThreeLCEncoded encoded =
        threelc_encode(sum, DType::kFloat32, mine, owner_residual, sparsity,
                       reinterpret_cast<uint8_t*>(reduced + sizeof(PartHeader)), name.c_str());
    header->scale = encoded.scale;
    header->bytes = static_cast<uint32_t>(encoded.bytes);
  }

  // Step 4: allgather the re-encoded partitions; decode each into place (and into the
  // extra outputs from the same stores). q * scale / divisor equals q * (scale / divisor)
  // bitwise in float32 (q is -1, 0 or 1), so the division rides in the decode table.
  std::vector<size_t> recv_offset(n + 1, 0);
  for (int p = 0; p < n; ++p) recv_offset[p + 1] = recv_offset[p] + slot_bytes(elems(p));
  char* gathered = recv;
  const size_t reduced_bytes = sizeof(PartHeader) + reinterpret_cast<const PartHeader*>(reduced)->bytes;
  exchange([&](int q) { return std::make_pair(gathered + recv_offset[q], slot_bytes(elems(q))); },
           [&](int) { return std::make_pair(static_cast<const char*>(reduced), reduced_bytes); },
           deadline, [&] { return what() + ": 3LC allgather"; }, status);
  std::memcpy(gathered + recv_offset[me], reduced, reduced_bytes);
  const bool fuse = dtype == DType::kFloat32 || divisor == 1.0;
  const size_t extras = also_out ? also_out->size() : 0;
  for (int p = 0; p < n; ++p) {
    const auto* header = reinterpret_cast<const PartHeader*>(gathered + recv_offset[p]);
    check_body_fits(*header, slot_bytes(elems(p)), me, p, what);
    const float scale = fuse && divisor != 1.0
                            ? static_cast<float>(header->scale / static_cast<float>(divisor))
                            : header->scale;
    threelc_decode(reinterpret_cast<const uint8_t*>(gathered + recv_offset[p] + sizeof(PartHeader)),
                   header->bytes, scale, elems(p), data + begin(p) * esize, dtype, name.c_str(),
                   fuse && extras > 0 ? static_cast<char*>((*also_out)[0]) + begin(p) * esize : nullptr);
  }
  if (!fuse) divide_in_place(data, count, dtype, divisor);
  for (size_t e = fuse ? 1 : 0; e < extras; ++e) std::memcpy((*also_out)[e], data, count * esize);
}

}  // namespace pbm
