#include "transport.h"

#include <algorithm>
#include <sstream>
#include <thread>

namespace pbm {

namespace {
thread_local bool polite_polling = false;
// Transports this process made; the ranks agree on the largest count at each construction.
std::atomic<uint64_t> transports_made{0};
std::atomic<bool> oversubscribed{false};

// Called every 64 unsuccessful polls. Every waiting thread spins briefly, then yields the
// core: with more processes than cores (oversubscribed test runs, hyperthreads shared with
// data loaders) a spinning rank would otherwise burn its whole time slice while the peer
// it waits for cannot run. The progress thread additionally naps once a wait is long.
inline void back_off(uint64_t spin) {
  // Oversubscribed: 1024 polls of MPI_Testsome (100-300 us) spun on a core the peer we wait
  // for is queued on made a 4-rank 4 KiB allreduce on 2 cores take 337 us (issue 20).
  if (spin < 1024 && !oversubscribed.load(std::memory_order_relaxed)) return;
  if (!polite_polling || spin < 16384) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}
}  // namespace

void Transport::set_polite_polling_for_this_thread(bool polite) { polite_polling = polite; }

void Transport::set_oversubscribed(bool value) { oversubscribed.store(value); }

void Transport::back_off_for_this_thread(uint64_t spin) { back_off(spin); }

void Transport::set_world_ranks(std::vector<int> world_of) { world_of_ = std::move(world_of); }

Transport::Transport(MPI_Comm comm) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw PbmError("MPI is not initialized: call pybrain_mpi.init() first");
  check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  uint64_t mine = transports_made.fetch_add(1) + 1;
  check(MPI_Allreduce(&mine, &epoch_, 1, MPI_UINT64_T, MPI_MAX, comm_), "MPI_Allreduce (transport epoch)");
  uint64_t seen = transports_made.load();
  while (seen < epoch_ && !transports_made.compare_exchange_weak(seen, epoch_)) {
  }
}

Transport::~Transport() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  // After an abort, peers may still hold messages for us; freeing is still legal (MPI
  // defers it until pending operations finish), so only skip it once MPI is gone.
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void Transport::check(int rc, const char* what) const {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  std::ostringstream message;
  message << "rank " << world_rank(rank_) << ": " << what << " failed: " << std::string(text, length);
  throw PbmError(message.str());
}

char* Transport::scratch(size_t slot, size_t bytes) {
  if (scratch_.size() <= slot) {
    scratch_.resize(slot + 1);
    scratch_bytes_.resize(slot + 1, 0);
  }
  if (scratch_bytes_[slot] < bytes) {
    const size_t grown = std::max(bytes, scratch_bytes_[slot] + scratch_bytes_[slot] / 2);
    scratch_[slot].reset(new char[grown]);
    scratch_bytes_[slot] = grown;
  }
  return scratch_[slot].get();
}

void Transport::cancel_pending(std::vector<MPI_Request>& requests,
                               const std::vector<bool>& is_recv) {
  for (size_t i = 0; i < requests.size(); ++i) {
    if (requests[i] == MPI_REQUEST_NULL) continue;
    // A posted receive can be cancelled locally; a send cannot be taken back, so it is
    // released and MPI completes it whenever the peer shows up.
    if (is_recv[i]) {
      MPI_Cancel(&requests[i]);
      MPI_Request_free(&requests[i]);
    } else {
      MPI_Request_free(&requests[i]);
    }
  }
}

void Transport::throw_peer_failure(int rc, const char* call, const std::vector<MPI_Request>& pending,
                                   const std::vector<int>& peers, const Progress& progress) const {
  // After a failed test MPI may already have released the failing request; every request
  // not known complete counts as pending (with one peer, as on the 2-rank ring, that peer).
  std::vector<int> failed;
  for (size_t i = 0; i < pending.size(); ++i) {
    if (pending[i] != MPI_REQUEST_NULL) failed.push_back(world_rank(peers[i]));
  }
  if (failed.empty()) {
    for (int peer : peers) failed.push_back(world_rank(peer));
  }
  std::sort(failed.begin(), failed.end());
  failed.erase(std::unique(failed.begin(), failed.end()), failed.end());
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  std::string detail(text, length);
  // MPICH's error stacks span lines; one line keeps the message readable.
  for (char& c : detail) if (c == '\n') c = ' ';
  std::ostringstream message;
  message << "rank " << world_rank(rank_) << ": " << progress.describe() << " failed while waiting for rank"
          << (failed.size() == 1 ? " " : "s ");
  for (size_t i = 0; i < failed.size(); ++i) message << (i ? ", " : "") << failed[i];
  message << ": the MPI library reported an error (" << call << ": " << detail
          << "); the peer process has most likely died";
  throw PeerFailureError(message.str(), failed);
}

void Transport::throw_timeout(const std::vector<MPI_Request>& requests,
                              const std::vector<int>& peers, const Progress& progress,
                              bool aborted) {
  std::vector<int> missing;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (requests[i] != MPI_REQUEST_NULL) missing.push_back(world_rank(peers[i]));
  }
  std::sort(missing.begin(), missing.end());
  missing.erase(std::unique(missing.begin(), missing.end()), missing.end());
  std::ostringstream message;
  message << "rank " << world_rank(rank_) << ": " << progress.describe()
          << (aborted ? " was aborted (engine shutting down)" : " timed out") << "; waiting for rank"
          << (missing.size() == 1 ? " " : "s ");
  for (size_t i = 0; i < missing.size(); ++i) message << (i ? ", " : "") << missing[i];
  throw CollectiveTimeoutError(message.str(), missing);
}

void Transport::wait_all(std::vector<MPI_Request>& requests, const std::vector<int>& peers,
                         const std::vector<bool>& is_recv, const Progress& progress,
                         bool cancellable) {
  size_t reported_pending = requests.size() + 1;  // nothing reported yet
  // MPI_Testsome, not MPI_Testall: Testall leaves every request untouched until all are
  // done, and then a timeout could not tell which peers had already answered.
  std::vector<int> completed(requests.size());
  size_t pending = 0;
  for (const MPI_Request& request : requests) pending += request != MPI_REQUEST_NULL;
  for (uint64_t spin = 0;; ++spin) {
    if (pending == 0) return;
    int count = 0;
    const int rc = MPI_Testsome(static_cast<int>(requests.size()), requests.data(), &count,
                                completed.data(), MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) throw_peer_failure(rc, "MPI_Testsome", requests, peers, progress);
    if (count == MPI_UNDEFINED) return;  // no active request left
    pending -= static_cast<size_t>(count);
    if (pending == 0) return;
    // Reading the clock costs ~20 ns; MPI_Testall a few hundred. Check every 64 polls.
    if ((spin & 63) == 63) {
      // Re-report whenever the set of peers still pending shrinks, so a waiter that
      // times out names exactly the ranks that are late.
      if (pending != reported_pending) {
        std::vector<int> waiting;
        for (size_t i = 0; i < requests.size(); ++i)
          if (requests[i] != MPI_REQUEST_NULL) waiting.push_back(world_rank(peers[i]));
        std::sort(waiting.begin(), waiting.end());
        waiting.erase(std::unique(waiting.begin(), waiting.end()), waiting.end());
        progress.report(std::move(waiting));
        reported_pending = pending;
      }
      back_off(spin);
      const bool aborted = aborted_.load();
      if (aborted || progress.expired(Clock::now())) {
        std::vector<MPI_Request> snapshot = requests;
        if (cancellable) cancel_pending(requests, is_recv);
        throw_timeout(snapshot, peers, progress, aborted);
      }
    }
  }
}

MPI_Status Transport::wait_one(MPI_Request& request, int peer, bool is_recv,
                               const Progress& progress) {
  MPI_Status result;
  for (uint64_t spin = 0;; ++spin) {
    int done = 0;
    const int rc = MPI_Test(&request, &done, &result);
    if (rc != MPI_SUCCESS) throw_peer_failure(rc, "MPI_Test", {}, {peer}, progress);
    if (done) return result;
    if ((spin & 63) == 63) {
      if (spin == 63) progress.report({world_rank(peer)});
      back_off(spin);
      const bool aborted = aborted_.load();
      if (aborted || progress.expired(Clock::now())) {
        std::vector<MPI_Request> one{request};
        std::vector<MPI_Request> snapshot = one;
        cancel_pending(one, {is_recv});
        request = MPI_REQUEST_NULL;
        throw_timeout(snapshot, {peer}, progress, aborted);
      }
    }
  }
}

}  // namespace pbm
