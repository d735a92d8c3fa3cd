#include "negotiation.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>

namespace pbm {

namespace {
// A round's message: how many headers follow, then the headers.
constexpr size_t kListPrefixBytes = sizeof(uint64_t);
constexpr size_t kListSlotBytes = kListPrefixBytes + kMaxProposals * sizeof(CollectiveHeader);
}  // namespace

void Negotiator::exchange(const std::vector<CollectiveHeader>& mine, const Progress& progress) {
  const int n = transport_.size();
  const int me = transport_.rank();
  const size_t count = std::min(mine.size(), kMaxProposals);
  lists_.assign(n, {});
  lists_[me].assign(mine.begin(), mine.begin() + static_cast<long>(count));
  if (n > 1) {
    const size_t message_bytes = kListPrefixBytes + count * sizeof(CollectiveHeader);
    char* send = transport_.scratch(kScratchNegotiateSend, message_bytes);
    const uint64_t count64 = count;
    std::memcpy(send, &count64, sizeof(count64));
    if (count) std::memcpy(send + kListPrefixBytes, mine.data(), count * sizeof(CollectiveHeader));
    char* recv = transport_.scratch(kScratchNegotiateRecv, kListSlotBytes * n);

    std::vector<MPI_Request> requests;
    std::vector<int> peers;
    std::vector<bool> is_recv;
    requests.reserve(2 * (n - 1));
    for (int peer = 0; peer < n; ++peer) {
      if (peer == me) continue;
      requests.emplace_back();
      transport_.check(MPI_Irecv(recv + kListSlotBytes * peer, static_cast<int>(kListSlotBytes), MPI_BYTE, peer,
                                 transport_.negotiate_tag(), transport_.comm(), &requests.back()),
                       "MPI_Irecv (negotiation)");
      peers.push_back(peer);
      is_recv.push_back(true);
    }
    for (int peer = 0; peer < n; ++peer) {
      if (peer == me) continue;
      requests.emplace_back();
      transport_.check(MPI_Isend(send, static_cast<int>(message_bytes), MPI_BYTE, peer, transport_.negotiate_tag(),
                                 transport_.comm(), &requests.back()),
                       "MPI_Isend (negotiation)");
      transport_.bytes_sent += message_bytes;
      peers.push_back(peer);
      is_recv.push_back(false);
    }
    transport_.wait_all(requests, peers, is_recv,
                        Progress(progress, "negotiating the order of collectives with every rank"));
    for (int peer = 0; peer < n; ++peer) {
      if (peer == me) continue;
      const char* slot = recv + kListSlotBytes * peer;
      uint64_t theirs = 0;
      std::memcpy(&theirs, slot, sizeof(theirs));
      if (theirs > kMaxProposals) {
        throw CollectiveMismatchError("rank " + std::to_string(me) + ": rank " + std::to_string(peer) +
                                      " sent a malformed negotiation message: is every rank running the "
                                      "same pybrain-mpi build?");
      }
      lists_[peer].resize(theirs);
      if (theirs) std::memcpy(lists_[peer].data(), slot + kListPrefixBytes, theirs * sizeof(CollectiveHeader));
      for (const CollectiveHeader& h : lists_[peer]) {
        if (h.magic != kHeaderMagic || h.version != kHeaderVersion) {
          throw CollectiveMismatchError("rank " + std::to_string(me) + ": rank " + std::to_string(peer) +
                                        " sent a malformed collective header while negotiating: is every "
                                        "rank running the same pybrain-mpi build?");
        }
      }
    }
  }
  keys_.assign(n, {});
  for (int r = 0; r < n; ++r) keys_[r] = keys(r);
}

std::vector<Negotiator::Key> Negotiator::keys(int rank) const {
  std::vector<Key> out;
  out.reserve(lists_[rank].size());
  std::map<uint64_t, uint64_t> seen;
  for (const CollectiveHeader& h : lists_[rank]) out.emplace_back(h.name_hash, seen[h.name_hash]++);
  return out;
}

long Negotiator::find(int rank, const Key& key) const {
  const std::vector<Key>& list = keys_[rank];
  const auto it = std::find(list.begin(), list.end(), key);
  return it == list.end() ? -1 : static_cast<long>(it - list.begin());
}

NegotiationDecision Negotiator::decide() const {
  const int n = transport_.size();
  const int me = transport_.rank();
  NegotiationDecision decision;
  decision.all_empty = std::all_of(lists_.begin(), lists_.end(), [](const auto& list) { return list.empty(); });
  // The agreed order: rank 0's, restricted to what every rank has pending. Any order every
  // rank shares would do, since the collectives then run one at a time; rank 0's keeps the
  // order of the usual case, where one rank is merely late.
  std::vector<long> where(n);
  for (const Key& key : keys_[0]) {
    bool everywhere = true;
    for (int r = 0; r < n && everywhere; ++r) {
      where[r] = find(r, key);
      everywhere = where[r] >= 0;
    }
    if (!everywhere) continue;
    const CollectiveHeader& first = lists_[0][where[0]];
    std::string difference;
    int differing = -1;
    for (int r = 1; r < n && differing < 0; ++r) {
      if (!same_collective(first, lists_[r][where[r]], &difference)) differing = r;
    }
    const size_t mine = static_cast<size_t>(where[me]);
    if (differing < 0) {
      decision.run.push_back(mine);
      continue;
    }
    std::ostringstream message;
    message << "rank " << me << ": ranks called the same collective with a different " << difference
            << ": rank " << differing << " called " << describe_header(lists_[differing][where[differing]])
            << ", rank 0 called " << describe_header(first) << ":";
    for (int r = 0; r < n; ++r) message << "\n  rank " << r << ": " << describe_header(lists_[r][where[r]]);
    message << "\nEvery rank must call a collective of a given name with the same dtype, element count and "
               "options.";
    decision.mismatched.push_back({mine, message.str()});
  }
  return decision;
}

std::vector<int> Negotiator::missing(size_t index) const {
  const int me = transport_.rank();
  std::vector<int> out;
  if (index >= keys_[me].size()) return out;
  const Key& key = keys_[me][index];
  for (int r = 0; r < static_cast<int>(keys_.size()); ++r) {
    if (r != me && find(r, key) < 0) out.push_back(r);
  }
  return out;
}

}  // namespace pbm
