#include "handshake.h"

#include <cstring>
#include <sstream>

#include "../common/dtype.h"
#include "collective.h"

namespace pbm {

namespace {
constexpr size_t kSlotBytes = sizeof(CollectiveHeader) + kMaxInlinePayloadBytes;
}  // namespace

uint64_t name_hash(const std::string& name) {
  uint64_t hash = 0xcbf29ce484222325ull;  // FNV-1a, 64 bit
  for (const unsigned char c : name) {
    hash ^= c;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

uint64_t unnamed_hash(uint64_t place) {
  // Another starting point than any name's, then the place's bytes.
  uint64_t hash = 0x84222325cbf29ce4ull;
  for (int i = 0; i < 8; ++i) {
    hash ^= (place >> (8 * i)) & 0xff;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

bool same_collective(const CollectiveHeader& a, const CollectiveHeader& b, std::string* what) {
  const char* difference = nullptr;
  if (a.kind != b.kind) difference = "kind";
  else if (a.dtype != b.dtype) difference = "dtype";
  else if (a.count != b.count) difference = "element count";
  else if (a.op != b.op) difference = "op";
  else if (a.algorithm != b.algorithm) difference = "algorithm";
  else if (a.root != b.root) difference = "root";
  else if (a.sparsity != b.sparsity) difference = "compression";
  else if (a.signature != b.signature) difference = "caller's signature (shape, dtype or scale factors)";
  else if (a.threelc_block != b.threelc_block) difference = "compression (3LC block size)";
  if (difference && what) *what = difference;
  return difference == nullptr;
}

std::string describe_header(const CollectiveHeader& header) {
  std::ostringstream out;
  const auto kind = static_cast<CollectiveKind>(header.kind);
  out << "#" << header.seq << " " << collective_kind_name(kind);
  if (header.name[0]) out << " '" << std::string(header.name, strnlen(header.name, 64)) << "'";
  else if (header.unnamed) out << " (unnamed call " << header.unnamed << ")";
  out << " (" << dtype_name(static_cast<DType>(header.dtype)) << " x " << header.count;
  if (kind == CollectiveKind::kAllreduce) {
    out << ", op=" << reduce_op_name(static_cast<ReduceOp>(header.op))
        << ", algorithm=" << algorithm_name(static_cast<Algorithm>(header.algorithm));
    if (header.sparsity > 0) {
      out << ", compression=3lc(s=" << header.sparsity;
      if (header.threelc_block) out << ", block=" << header.threelc_block;
      out << ")";
    }
    if (header.signature) out << ", signature=" << std::hex << header.signature << std::dec;
  }
  if (kind == CollectiveKind::kBroadcast) out << ", root=" << header.root;
  out << ")";
  return out.str();
}

bool Handshake::exchange(const CollectiveHeader& mine, const void* payload, const Progress& progress) {
  const int n = transport_.size();
  const int me = transport_.rank();
  headers_.assign(n, CollectiveHeader{});
  payloads_.assign(n, nullptr);
  headers_[me] = mine;
  payloads_[me] = static_cast<const char*>(payload);
  order_broken_ = false;
  if (n == 1) return true;

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
                               peer, transport_.header_tag(), transport_.comm(), &requests.back()),
                     "MPI_Irecv (join)");
    peers.push_back(peer);
    is_recv.push_back(true);
  }
  for (int peer = 0; peer < n; ++peer) {
    if (peer == me) continue;
    requests.emplace_back();
    transport_.check(MPI_Isend(send, static_cast<int>(message_bytes), MPI_BYTE, peer, transport_.header_tag(),
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
  return check_agreement(progress);
}

bool Handshake::check_agreement(const Progress& progress) {
  const int n = transport_.size();
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
  }
  // Different names: different collectives, never paired; the engine negotiates.
  const CollectiveHeader& first = headers_[0];
  for (int r = 1; r < n; ++r) {
    if (headers_[r].name_hash != first.name_hash) return false;
  }
  std::string difference;
  int differing = -1;
  for (int r = 1; r < n && differing < 0; ++r) {
    if (!same_collective(first, headers_[r], &difference)) differing = r;
  }
  if (differing < 0) return true;
  std::ostringstream message;
  message << "rank " << transport_.rank() << ": ranks called the same collective with a different "
          << difference << ": rank " << differing << " called " << describe_header(headers_[differing])
          << ", rank 0 called " << describe_header(first) << ":";
  for (int r = 0; r < n; ++r) message << "\n  rank " << r << ": " << describe_header(headers_[r]);
  message << "\nEvery rank must call a collective of a given name with the same dtype, element "
             "count and options.";
  throw CollectiveMismatchError(message.str());
}

}  // namespace pbm
