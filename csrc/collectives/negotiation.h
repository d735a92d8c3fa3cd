// Negotiation: agreeing on which collectives to run, and in what order, when ranks submitted
// them in different orders.
//
// Collectives are matched by name (CollectiveHeader::name_hash: a given name, or an unnamed
// call's place among its rank's unnamed calls); the k-th pending call of a name on one rank
// pairs with the k-th pending call of that name on every other. The steady state needs no
// negotiation at all: each collective starts with the join (handshake.h), in which every rank
// proposes the oldest collective it has pending; when all propose the same name, that is the
// agreement, so ranks that submit in the same order (the agreed order stays the submission
// order) pay nothing beyond the join they always paid. Only when the join shows different
// names do the ranks negotiate, here:
//
//   1. Each rank sends every peer the headers of its oldest pending collectives (up to
//      kMaxProposals, in its submission order) and receives theirs: one round.
//   2. Every rank computes the same decision from the same lists: the collectives every rank
//      has pending run, in the order of rank 0's list; one whose kind, dtype, count, op,
//      algorithm, compression or root differs across ranks fails on every rank with
//      CollectiveMismatch naming the ranks and both descriptions.
//   3. With nothing common yet (a rank has not submitted its share), the ranks wait for new
//      submissions (with a short back-off) and run another round. A collective whose deadline
//      passes fails with CollectiveTimeout naming the ranks that have not submitted it; a
//      round a peer does not answer by the deadline names that peer.
//
// As Horovod's coordinator, the decision is taken from every rank's requests and the same on
// all ranks; unlike it there is no coordinator rank (each rank sees every list, as in the
// join), and no cycle: nothing runs while the ranks agree. Horovod's response cache plays the
// role the join plays here: the fast path that skips negotiation while the order holds.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "handshake.h"
#include "transport.h"

namespace pbm {

// Most collectives a rank lists in one round (its oldest pending ones).
constexpr size_t kMaxProposals = 128;

// What every rank concludes from one round; indices are into this rank's own list.
struct NegotiationDecision {
  std::vector<size_t> run;  // to run now, in the agreed order
  struct Mismatch {
    size_t index;
    std::string message;
  };
  std::vector<Mismatch> mismatched;  // fail on every rank with CollectiveMismatch
  bool all_empty = false;            // no rank has anything pending: negotiation is over
};

class Negotiator {
 public:
  explicit Negotiator(Transport& transport) : transport_(transport) {}

  // One round: sends `mine` (this rank's oldest pending collectives, submission order; at
  // most kMaxProposals) to every peer and receives every peer's list. Throws
  // CollectiveTimeoutError naming the peers whose list did not arrive by the deadline.
  void exchange(const std::vector<CollectiveHeader>& mine, const Progress& progress);

  // The decision from the last exchange (the same on every rank).
  NegotiationDecision decide() const;

  // The ranks whose last list lacked entry `index` of ours (they have not submitted it).
  std::vector<int> missing(size_t index) const;

 private:
  // key of entry i of rank r's list: (name_hash, how many earlier entries share it)
  using Key = std::pair<uint64_t, uint64_t>;
  std::vector<Key> keys(int rank) const;
  // position of `key` in rank r's list, or -1
  long find(int rank, const Key& key) const;

  Transport& transport_;
  std::vector<std::vector<CollectiveHeader>> lists_;  // per rank
  std::vector<std::vector<Key>> keys_;                // per rank, filled by exchange()
};

}  // namespace pbm
