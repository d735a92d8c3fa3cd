#include "handshake.h"

#include <cstring>
#include <sstream>

#include "../common/dtype.h"
#include "collective.h"

namespace pbm {

namespace {
constexpr size_t kSlotBytes = sizeof(CollectiveHeader) + kMaxInlinePayloadBytes;
}  // namespace

std::string describe_header(const CollectiveHeader& header) {
  std::ostringstream out;
  const auto kind = static_cast<CollectiveKind>(header.kind);
  out << "#" << header.seq << " " << collective_kind_name(kind);
  if (header.name[0]) out << " '" << std::string(header.name, strnlen(header.name, 64)) << "'";
  out << " (" << dtype_name(static_cast<DType>(header.dtype)) << " x " << header.count;
  if (kind == CollectiveKind::kAllreduce) {
    out << ", op=" << reduce_op_name(static_cast<ReduceOp>(header.op))
        << ", algorithm=" << algorithm_name(static_cast<Algorithm>(header.algorithm));
    if (header.sparsity > 0) out << ", compression=3lc(s=" << header.sparsity << ")";
  }
  if (kind == CollectiveKind::kBroadcast) out << ", root=" << header.root;
  out << ")";
  return out.str();
}

void Handshake::exchange(const CollectiveHeader& mine, const void* payload, const Progress& progress) {
  const int n = transport_.size();
  const int me = transport_.rank();
  headers_.assign(n, CollectiveHeader{});
  payloads_.assign(n, nullptr);
  headers_[me] = mine;
  payloads_[me] = static_cast<const char*>(payload);
  order_broken_ = false;
  if (n == 1) return;

  const size_t message_bytes = sizeof(CollectiveHeader) + mine.payload_bytes;
  char* send = transport_.scratch(kScratchJoinSend, message_bytes);
  std::memcpy(send, &mine, sizeof(CollectiveHeader));
  if (mine.payload_bytes) std::memcpy(send + sizeof(CollectiveHeader), payload, mine.payload_bytes);
  char* recv = transport_.scratch(kScratchJoinRecv, kSlotBytes * n);

  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  std::vector<bool> is_recv;
  requests.reserve(2 * (n - 1));
  // Receives first, so the peers' eager messages land in place rather than being buffered.
  for (int peer = 0; peer < n; ++peer) {
    if (peer == me) continue;
    requests.emplace_back();
    transport_.check(MPI_Irecv(recv + kSlotBytes * peer, static_cast<int>(kSlotBytes), MPI_BYTE,
                               peer, kTagHeader, transport_.comm(), &requests.back()),
                     "MPI_Irecv (join)");
    peers.push_back(peer);
    is_recv.push_back(true);
  }
  for (int peer = 0; peer < n; ++peer) {
    if (peer == me) continue;
    requests.emplace_back();
    transport_.check(MPI_Isend(send, static_cast<int>(message_bytes), MPI_BYTE, peer, kTagHeader,
                               transport_.comm(), &requests.back()),
                     "MPI_Isend (join)");
    transport_.bytes_sent += message_bytes;
    peers.push_back(peer);
    is_recv.push_back(false);
  }
  transport_.wait_all(requests, peers, is_recv, Progress(progress, "waiting for ranks to join"));
  for (int peer = 0; peer < n; ++peer) {
    if (peer == me) continue;
    std::memcpy(&headers_[peer], recv + kSlotBytes * peer, sizeof(CollectiveHeader));
    payloads_[peer] = recv + kSlotBytes * peer + sizeof(CollectiveHeader);
  }
  check_agreement(progress);
}

void Handshake::check_agreement(const Progress& progress) {
  const int n = transport_.size();
  const CollectiveHeader& first = headers_[0];
  bool agree = true;
  for (int r = 0; r < n; ++r) {
    const CollectiveHeader& h = headers_[r];
    if (h.magic != kHeaderMagic || h.version != kHeaderVersion) {
      std::ostringstream message;
      message << "rank " << transport_.rank() << ": " << progress.describe() << ": rank " << r
              << " sent a malformed join header (magic/version mismatch): is every rank running "
                 "the same pybrain-mpi build?";
      order_broken_ = true;
      throw CollectiveMismatchError(message.str());
    }
    if (h.seq != first.seq) order_broken_ = true;
    if (h.seq != first.seq || h.kind != first.kind || h.algorithm != first.algorithm ||
        h.op != first.op || h.dtype != first.dtype || h.count != first.count ||
        h.root != first.root || h.sparsity != first.sparsity) {
      agree = false;
    }
  }
  if (agree) return;
  std::ostringstream message;
  message << "rank " << transport_.rank() << ": ranks called different collectives";
  if (order_broken_) message << " (they disagree on the order of collectives)";
  message << ":";
  for (int r = 0; r < n; ++r) message << "\n  rank " << r << ": " << describe_header(headers_[r]);
  message << "\nEvery rank must issue the same collectives, in the same order, with the same "
             "dtype, element count and options.";
  throw CollectiveMismatchError(message.str());
}

}  // namespace pbm
