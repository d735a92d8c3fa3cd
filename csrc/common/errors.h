// The native core's failure families. Every throw in csrc/ is one of these; bindings.cpp
// translates each into the Python class of the same meaning in pybrain_mpi/errors.py.
// Messages already name rank and operation; failures that involve other ranks also carry
// those ranks as a field.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pbm {

// Anything wrong that is neither a timeout nor a cross-rank mismatch (MPI errors, a
// shut-down engine, bad arguments that slipped past Python).
class PbmError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A blocking wait ran past its deadline. missing_ranks are the ranks that had not joined
// the collective (or, mid-algorithm, the peer that was being waited for).
class CollectiveTimeoutError : public PbmError {
 public:
  CollectiveTimeoutError(const std::string& message, std::vector<int> missing_ranks)
      : PbmError(message), missing_ranks_(std::move(missing_ranks)) {}
  const std::vector<int>& missing_ranks() const { return missing_ranks_; }

 private:
  std::vector<int> missing_ranks_;
};

// A failure every rank detected and raised alike (e.g. a NaN gradient under 3LC): the
// ranks are still in step, so later collectives can run. `ranks` (world ranks) are the
// ones that reported it: under 3LC the ranks whose gradient held NaN/Inf, or, for a node
// peer that learnt it through shared memory, the node rank owning the failing slice.
class AgreedFailureError : public PbmError {
 public:
  AgreedFailureError(const std::string& message, std::vector<int> ranks)
      : PbmError(message), ranks_(std::move(ranks)) {}
  const std::vector<int>& ranks() const { return ranks_; }

 private:
  std::vector<int> ranks_;
};

// The MPI library failed a wait on other ranks (typically: a peer process died, so a
// transfer from or to it can never complete). `ranks` (world ranks) are the peers the wait
// was still waiting for; the message names them and carries MPI's own error text.
class PeerFailureError : public PbmError {
 public:
  PeerFailureError(const std::string& message, std::vector<int> ranks)
      : PbmError(message), ranks_(std::move(ranks)) {}
  const std::vector<int>& ranks() const { return ranks_; }

 private:
  std::vector<int> ranks_;
};

// Ranks called the same collective with different sizes, dtypes, ops or order.
// `order_broken`: the ranks disagree on the order of collectives (later ones cannot match
// either), when the algorithm found it without the handshake (the small-message path).
class CollectiveMismatchError : public PbmError {
 public:
  explicit CollectiveMismatchError(const std::string& message, bool order_broken = false)
      : PbmError(message), order_broken_(order_broken) {}
  bool order_broken() const { return order_broken_; }

 private:
  bool order_broken_ = false;
};

}  // namespace pbm
