#include "compressed_allreduce.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <vector>

#include "../common/partition.h"
#include "../compression/threelc.h"
#include "../kernels/reduce.h"

namespace pbm {

namespace {
// Precedes every encoded partition on the wire.
struct PartHeader {
  float scale = 0.f;
  uint32_t bytes = 0;
  uint32_t failed = 0;  // the sender's gradient had a NaN/Inf: nothing was encoded
  uint32_t reserved = 0;
};

size_t slot_bytes(size_t elements, uint32_t block) {
  return sizeof(PartHeader) + threelc_max_encoded_bytes(elements, block);
}

PartHeader* header_at(char* slot) { return reinterpret_cast<PartHeader*>(slot); }
const PartHeader* header_at(const char* slot) { return reinterpret_cast<const PartHeader*>(slot); }
uint8_t* body_at(char* slot) { return reinterpret_cast<uint8_t*>(slot + sizeof(PartHeader)); }
const uint8_t* body_at(const char* slot) { return reinterpret_cast<const uint8_t*>(slot + sizeof(PartHeader)); }

// A peer's message claiming a body larger than its slot can hold is corrupt: refuse it
// rather than decode past the buffer.
void check_body_fits(const char* slot, size_t slot_size, int me, int peer, const Progress& progress) {
  if (header_at(slot)->bytes > slot_size - sizeof(PartHeader)) {
    throw PbmError("rank " + std::to_string(me) + ": " + progress.describe() + ": rank " + std::to_string(peer) +
                   " sent a 3LC partition larger than possible (corrupt message)");
  }
}
}  // namespace

struct ThreeLCExchange::Call {
  const ThreeLCExchangeArgs& args;
  int n;
  int me;
  char* data;
  size_t esize;
  Partition parts;  // partition p is reduced (and re-encoded) by rank p
  // Slot p of a back-to-back layout of one encoded partition each: the step-1 send buffer
  // and the step-4 receive area.
  std::vector<size_t> slot_offset;
  char* send;
  char* recv;      // step 1: n slots of our partition; step 4: the back-to-back layout
  size_t my_slot;  // slot bytes of our partition
  float* sum;      // float32 reduction of our partition
  bool fused;      // node inputs: `data` is formed inside the encode passes
  std::vector<const float*> at;
  bool own_residual_nonzero = false;

  size_t begin(int p) const { return parts.begin(p); }
  size_t elems(int p) const { return parts.length(p); }
  // The node inputs shifted to `offset` (fused only).
  const float* const* inputs_at(size_t offset) {
    for (int q = 0; q < args.node_input_count; ++q) at[q] = args.node_inputs[q] + offset;
    return at.data();
  }
};

size_t ThreeLCExchange::owner_residual_count(size_t count) const {
  return Partition::even(count, transport_.size()).length(transport_.rank());
}

template <typename RecvSlot, typename SendSlot>
void ThreeLCExchange::exchange(const RecvSlot& recv_slot, const SendSlot& send_slot, const Progress& progress) {
  const int n = transport_.size();
  const int me = transport_.rank();
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  std::vector<bool> is_recv;
  for (int q = 0; q < n; ++q) {
    if (q == me) continue;
    const auto [buffer, capacity] = recv_slot(q);
    requests.emplace_back();
    transport_.check(MPI_Irecv(buffer, static_cast<int>(capacity), MPI_BYTE, q, kTagThreeLC,
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
                               kTagThreeLC, transport_.comm(), &requests.back()),
                     "MPI_Isend (3LC)");
    transport_.bytes_sent += bytes;
    peers.push_back(q);
    is_recv.push_back(false);
  }
  transport_.wait_all(requests, peers, is_recv, progress);
}

ThreeLCExchange::Call ThreeLCExchange::plan(const ThreeLCExchangeArgs& args) {
  if (args.node_inputs != nullptr && args.dtype != DType::kFloat32)
    throw PbmError("3LC allreduce: node inputs are summed in float32 only, not " + std::string(dtype_name(args.dtype)));
  const int n = transport_.size();
  const int me = transport_.rank();
  Call call{args, n, me, static_cast<char*>(args.data), dtype_size(args.dtype), Partition::even(args.count, n),
            std::vector<size_t>(n + 1, 0), nullptr, nullptr, 0, nullptr, false, {}};
  for (int p = 0; p < n; ++p) call.slot_offset[p + 1] = call.slot_offset[p] + slot_bytes(call.elems(p), args.block);
  call.send = transport_.scratch(kScratchThreeLCSend, call.slot_offset[n]);
  call.my_slot = slot_bytes(call.elems(me), args.block);
  size_t recv_bytes = call.my_slot * n;
  for (int p = 0; p < n; ++p) recv_bytes = std::max(recv_bytes, slot_bytes(call.elems(p), args.block) * n);
  call.recv = transport_.scratch(kScratchThreeLCRecv, recv_bytes);
  call.sum = reinterpret_cast<float*>(
      transport_.scratch(kScratchThreeLCSum, std::max<size_t>(call.elems(me), 1) * sizeof(float)));
  call.fused = args.node_inputs != nullptr && args.node_input_count > 0;
  call.at.resize(call.fused ? args.node_input_count : 0);
  return call;
}

ThreeLCFailure ThreeLCExchange::run(const ThreeLCExchangeArgs& args, const Progress& progress) {
  Call call = plan(args);

  // Step 1: encode every partition but our own with the first-stage residual; our own goes
  // exact into the reduction. A NaN/Inf stops the encoding: every slot then says "failed".
  const std::string local_error = encode_shares(call);

  // Step 1 (wire): partition p goes to rank p; we receive the n-1 peers' encodings of ours.
  scatter(call, Progress(progress, "3LC reduce-scatter"));

  // Every rank sees every rank's flag for its partition, so all agree on the failure (and
  // on the ranks at fault) without another message.
  ThreeLCFailure failure = agreed_failure(call, local_error);
  if (failure.failed()) return failure;

  // Step 2: the peers' encodings of our partition are added to our exact share, in rank
  // order (avg divides here, before the second encode).
  reduce_own_partition(call, progress);

  // Step 3: the reduced partition is re-encoded with the owner's residual, into the step-1
  // send buffer (free again), so what it drops now is sent in a later step.
  char* reduced = call.send;
  const ThreeLCEncoded encoded = threelc_encode(Elements{call.sum, call.elems(call.me), DType::kFloat32},
                                                args.owner_residual, args.sparsity, body_at(reduced), args.name,
                                                args.block);
  *header_at(reduced) = PartHeader{encoded.scale, static_cast<uint32_t>(encoded.bytes), 0, 0};

  // Step 4: allgather the re-encoded partitions and decode each into place (and into the
  // extra outputs from the same stores): every rank decodes the same bytes.
  gather_and_decode(call, Progress(progress, "3LC allgather"));
  return failure;
}

std::string ThreeLCExchange::encode_shares(Call& call) {
  const ThreeLCExchangeArgs& args = call.args;
  const int me = call.me;
  std::string error;
  // Our own partition never crosses a wire: its exact sum with the residual goes straight
  // into the reduction (nothing is dropped, so its residual is delivered in full and
  // cleared in step 2). With node inputs (hierarchical, float32) `data` is not formed yet:
  // our partition is summed from them straight into `sum`.
  try {
    call.own_residual_nonzero =
        call.fused ? threelc_accumulate_n(call.inputs_at(call.begin(me)), args.node_input_count, call.elems(me),
                                          args.residual + call.begin(me), call.sum, args.name)
                   : threelc_accumulate(Elements{call.data + call.begin(me) * call.esize, call.elems(me), args.dtype},
                                        args.residual + call.begin(me), call.sum, args.name);
  } catch (const PbmError& e) {
    error = e.what();
  }
  for (int p = 0; p < call.n && error.empty(); ++p) error = encode_share(call, p);
  if (!error.empty()) {
    for (int p = 0; p < call.n; ++p) *header_at(call.send + call.slot_offset[p]) = PartHeader{0.f, 0, 1, 0};
  }
  return error;
}

std::string ThreeLCExchange::encode_share(Call& call, int p) {
  const ThreeLCExchangeArgs& args = call.args;
  char* slot = call.send + call.slot_offset[p];
  *header_at(slot) = PartHeader{};
  if (p == call.me) return {};
  try {
    float* residual = args.residual + call.begin(p);
    ThreeLCEncoded encoded;
    if (call.fused) {
      // The node sum is formed into `data` while max|sum + residual| is taken, so the
      // encode skips its first pass.
      float* part = reinterpret_cast<float*>(call.data) + call.begin(p);
      const uint32_t largest = threelc_reduce_max(part, call.inputs_at(call.begin(p)), args.node_input_count,
                                                  call.elems(p), residual);
      encoded = threelc_encode_known_max(Elements{part, call.elems(p), DType::kFloat32}, residual, args.sparsity,
                                         body_at(slot), largest, args.name, args.block);
    } else {
      encoded = threelc_encode(Elements{call.data + call.begin(p) * call.esize, call.elems(p), args.dtype}, residual,
                               args.sparsity, body_at(slot), args.name, args.block);
    }
    header_at(slot)->scale = encoded.scale;
    header_at(slot)->bytes = static_cast<uint32_t>(encoded.bytes);
  } catch (const PbmError& e) {
    return e.what();
  }
  return {};
}

void ThreeLCExchange::scatter(Call& call, const Progress& progress) {
  char* send = call.send;
  char* recv = call.recv;
  const size_t my_slot = call.my_slot;
  const std::vector<size_t>& offset = call.slot_offset;
  exchange([&](int q) { return std::make_pair(recv + my_slot * q, my_slot); },
           [&](int p) {
             const char* slot = send + offset[p];
             return std::make_pair(slot, sizeof(PartHeader) + header_at(slot)->bytes);
           },
           progress);
  std::memcpy(recv + my_slot * call.me, send + offset[call.me], my_slot);
}

ThreeLCFailure ThreeLCExchange::agreed_failure(const Call& call, const std::string& local_error) const {
  ThreeLCFailure failure;
  for (int q = 0; q < call.n; ++q) {
    // World ranks: a hierarchical allreduce runs this over a sub-communicator per slice.
    if (header_at(call.recv + call.my_slot * q)->failed) failure.ranks.push_back(transport_.world_rank(q));
  }
  if (failure.failed()) failure.local_error = local_error;
  return failure;
}

void ThreeLCExchange::reduce_own_partition(Call& call, const Progress& progress) {
  const ThreeLCExchangeArgs& args = call.args;
  const int me = call.me;
  const size_t mine = call.elems(me);
  if (call.own_residual_nonzero) std::fill(args.residual + call.begin(me), args.residual + call.begin(me) + mine, 0.f);
  for (int q = 0; q < call.n; ++q) {
    if (q == me) continue;
    const char* slot = call.recv + call.my_slot * q;
    check_body_fits(slot, call.my_slot, me, q, progress);
    threelc_decode_add(ThreeLCBody{body_at(slot), header_at(slot)->bytes, header_at(slot)->scale, args.block},
                       MutableElements{call.sum, mine, DType::kFloat32}, args.name);
  }
  if (args.average && call.n > 1) {
    const float inv = 1.0f / static_cast<float>(call.n);
    for (size_t i = 0; i < mine; ++i) call.sum[i] *= inv;
  }
}

void ThreeLCExchange::gather_and_decode(Call& call, const Progress& progress) {
  const ThreeLCExchangeArgs& args = call.args;
  const std::vector<size_t>& offset = call.slot_offset;
  char* gathered = call.recv;
  const char* reduced = call.send;
  const size_t reduced_bytes = sizeof(PartHeader) + header_at(reduced)->bytes;
  exchange([&](int q) { return std::make_pair(gathered + offset[q], offset[q + 1] - offset[q]); },
           [&](int) { return std::make_pair(reduced, reduced_bytes); }, progress);
  std::memcpy(gathered + offset[call.me], reduced, reduced_bytes);
  // q * scale / divisor equals q * (scale / divisor) bitwise in float32 (q is -1, 0 or 1),
  // so the division rides in the decode table; 16-bit outputs divide after decoding.
  const double divisor = args.divisor;
  // Block-scaled bodies carry their scales inside: the division then follows the decode.
  const bool fuse = args.block == 0 ? args.dtype == DType::kFloat32 || divisor == 1.0 : divisor == 1.0;
  const size_t extras = args.also_out ? args.also_out->size() : 0;
  for (int p = 0; p < call.n; ++p) {
    const char* slot = gathered + offset[p];
    check_body_fits(slot, offset[p + 1] - offset[p], call.me, p, progress);
    const float scale = fuse && divisor != 1.0 ? static_cast<float>(header_at(slot)->scale / static_cast<float>(divisor))
                                               : header_at(slot)->scale;
    char* also = fuse && extras > 0 ? static_cast<char*>((*args.also_out)[0]) + call.begin(p) * call.esize : nullptr;
    threelc_decode(ThreeLCBody{body_at(slot), header_at(slot)->bytes, scale, args.block},
                   MutableElements{call.data + call.begin(p) * call.esize, call.elems(p), args.dtype}, args.name, also);
  }
  if (!fuse) divide_in_place(call.data, args.count, args.dtype, divisor);
  for (size_t e = fuse ? 1 : 0; e < extras; ++e) std::memcpy((*args.also_out)[e], call.data, args.count * call.esize);
}

std::optional<ThreeLCLayout> ThreeLCAllreduce::threelc_layout(const AllreduceArgs& args) const {
  ThreeLCLayout layout;
  layout.path = ThreeLCPath::kFlat;
  layout.first = args.count;
  layout.second = exchange_.owner_residual_count(args.count);
  layout.ranks = transport_.size();
  layout.rank = transport_.rank();
  return layout;
}

AllreduceResult ThreeLCAllreduce::run(const AllreduceArgs& args, const Progress& progress) {
  ThreeLCExchangeArgs exchange;
  exchange.data = args.data;
  exchange.count = args.count;
  exchange.dtype = args.dtype;
  exchange.average = args.op == ReduceOp::kAvg;
  exchange.sparsity = args.wire.sparsity;
  exchange.block = args.wire.block;
  exchange.residual = args.residuals.first_data();
  exchange.owner_residual = args.residuals.second_data();
  exchange.name = args.name.c_str();
  const ThreeLCFailure failure = exchange_.run(exchange, progress);
  if (!failure.failed()) return {};
  std::ostringstream message;
  message << "rank " << transport_.rank() << ": " << progress.describe() << ": 3LC found NaN/Inf in the gradient on rank"
          << (failure.ranks.size() > 1 ? "s " : " ");
  for (size_t i = 0; i < failure.ranks.size(); ++i) message << (i ? ", " : "") << failure.ranks[i];
  message << "; no rank applied this allreduce";
  if (!failure.local_error.empty()) message << " (here: " << failure.local_error << ")";
  throw AgreedFailureError(message.str(), failure.ranks);
}

}  // namespace pbm
