#include "node_sync.h"

#include <new>
#include <sstream>

namespace pbm {

namespace {
constexpr size_t kFlagBytes = 64;  // one cache line per rank: no false sharing
}  // namespace

NodeSync::NodeSync(const Transport& world, MPI_Comm node_comm, int local_rank,
                   const std::vector<int>& world_of_local)
    : world_(world),
      local_rank_(local_rank),
      local_size_(static_cast<int>(world_of_local.size())),
      world_of_local_(world_of_local) {
  control_ = allocate_shared_window(world, node_comm, kFlagBytes);
  char* mine = control_.base[local_rank_];
  new (mine) std::atomic<uint64_t>(0);
  new (mine + 8) std::atomic<uint64_t>(0);
  new (mine + 16) std::atomic<uint64_t>(0);
  for (int q = 0; q < local_size_; ++q) {
    counter_.push_back(reinterpret_cast<std::atomic<uint64_t>*>(control_.base[q]));
    failed_.push_back(reinterpret_cast<std::atomic<uint64_t>*>(control_.base[q] + 8));
    nonfinite_.push_back(reinterpret_cast<std::atomic<uint64_t>*>(control_.base[q] + 16));
  }
  // Peers may read our flags only once they are constructed: the one barrier of the node
  // stage, at init, where every rank is anyway (like MPI_Comm_dup).
  world.check(MPI_Barrier(node_comm), "MPI_Barrier (node stage set-up)");
}

void NodeSync::wait(const char* phase, const Progress& progress) {
  if (local_size_ == 1) return;
  const uint64_t epoch = ++epoch_;
  counter_[local_rank_]->store(epoch, std::memory_order_release);
  bool reported = false;
  for (uint64_t spin = 0;; ++spin) {
    bool all = true;
    for (int q = 0; q < local_size_ && all; ++q) all = counter_[q]->load(std::memory_order_acquire) >= epoch;
    if (all) return;
    if ((spin & 63) != 63) continue;
    Transport::back_off_for_this_thread(spin);
    const bool aborted = aborted_.load() || world_.aborted();
    const bool late = progress.expired(Clock::now());
    if (reported && !aborted && !late) continue;
    std::vector<int> missing;
    for (int q = 0; q < local_size_; ++q)
      if (counter_[q]->load(std::memory_order_acquire) < epoch) missing.push_back(world_of_local_[q]);
    // Everyone arrived after all (this thread may have been descheduled, or the process
    // stopped, between the poll above and the clock read): that is not a timeout.
    if (missing.empty()) return;
    if (!reported) progress.report(progress.describe() + ": shared-memory " + phase, missing);
    reported = true;
    if (aborted || late) time_out(phase, missing, aborted, progress);
  }
}

void NodeSync::time_out(const char* phase, const std::vector<int>& missing, bool aborted,
                        const Progress& progress) const {
  std::ostringstream message;
  message << "rank " << world_.rank() << ": " << progress.describe() << ": shared-memory " << phase
          << (aborted ? " was aborted (engine shutting down)" : " timed out") << "; waiting for node rank"
          << (missing.size() == 1 ? " " : "s ");
  for (size_t i = 0; i < missing.size(); ++i) message << (i ? ", " : "") << missing[i];
  throw CollectiveTimeoutError(message.str(), missing);
}

void NodeSync::flag_failure() { failed_[local_rank_]->store(epoch_ + 1, std::memory_order_relaxed); }

void NodeSync::flag_nonfinite() { nonfinite_[local_rank_]->store(epoch_ + 1, std::memory_order_relaxed); }

int NodeSync::failed_rank() const {
  if (local_size_ == 1 || epoch_ == 0) return -1;
  for (int q = 0; q < local_size_; ++q)
    if (failed_[q]->load(std::memory_order_relaxed) == epoch_) return q;
  return -1;
}

bool NodeSync::nonfinite() const {
  if (local_size_ == 1) return false;
  for (int q = 0; q < local_size_; ++q)
    if (nonfinite_[q]->load(std::memory_order_relaxed) == epoch_) return true;
  return false;
}

}  // namespace pbm
