// The native core's failure families. bindings.cpp translates each into the Python class
// of the same meaning in pybrain_mpi/errors.py; messages already name rank and operation.
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
// ranks are still in step, so later collectives can run.
class AgreedFailureError : public PbmError {
 public:
  using PbmError::PbmError;
};

// Ranks called the same collective with different sizes, dtypes, ops or order.
class CollectiveMismatchError : public PbmError {
 public:
  using PbmError::PbmError;
};

}  // namespace pbm
