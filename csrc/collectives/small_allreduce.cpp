#include "small_allreduce.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <sstream>
#include <thread>

#include "../kernels/reduce.h"
#include "handshake.h"

namespace pbm {

namespace {
// Slot layout: the flag on its own cache line, then the header, then the data.
constexpr size_t kFlagOffset = 0;
constexpr size_t kHeaderOffset = 64;
constexpr size_t kDataOffset = (kHeaderOffset + sizeof(CollectiveHeader) + 63) / 64 * 64;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Collectives are matched by name (handshake.h): the same name hash, or the same place
// among the ranks' unnamed calls. Submission numbers may differ across ranks.
bool same_name(const CollectiveHeader& a, const CollectiveHeader& b) {
  return a.name_hash == b.name_hash && a.unnamed == b.unnamed &&
         std::strncmp(a.name, b.name, sizeof(a.name)) == 0;
}

bool same_call(const CollectiveHeader& a, const CollectiveHeader& b) {
  return a.magic == b.magic && a.version == b.version && same_name(a, b) && a.kind == b.kind &&
         a.algorithm == b.algorithm && a.op == b.op && a.dtype == b.dtype && a.count == b.count &&
         a.root == b.root && a.sparsity == b.sparsity && a.threelc_block == b.threelc_block;
}
}  // namespace

bool node_oversubscribed(int local_size) {
  cpu_set_t set;
  CPU_ZERO(&set);
  int cpus = 0;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  if (cpus <= 0) cpus = static_cast<int>(std::thread::hardware_concurrency());
  return cpus > 0 && local_size > cpus;
}

SmallAllreduce::SmallAllreduce(NodeStage& node)
    : node_(node),
      me_(node.local_rank()),
      local_size_(node.local_size()),
      oversubscribed_(node_oversubscribed(node.local_size())),
      slot_bytes_(kDataOffset + kCapacityBytes) {
  window_ = allocate_shared_window(node.world(), node.node_comm(), 2 * slot_bytes_);
  for (int parity = 0; parity < 2; ++parity) new (slot(me_, parity) + kFlagOffset) std::atomic<uint64_t>(0);
  // Peers read our flags only once they are constructed.
  node.world().check(MPI_Barrier(node.node_comm()), "MPI_Barrier (small-message allreduce set-up)");
  inputs_.resize(local_size_);
  headers_.resize(local_size_);
}

char* SmallAllreduce::slot(int local_rank, int parity) const {
  return window_.base[local_rank] + static_cast<size_t>(parity) * slot_bytes_;
}

std::atomic<uint64_t>* SmallAllreduce::flag(int local_rank, int parity) const {
  return reinterpret_cast<std::atomic<uint64_t>*>(slot(local_rank, parity) + kFlagOffset);
}

AllreduceResult SmallAllreduce::run(const AllreduceArgs& args, const Progress& progress) {
  const size_t bytes = args.bytes();
  if (bytes > kCapacityBytes || !args.header)
    throw PbmError("rank " + std::to_string(node_.world().rank()) + ": " + progress.describe() +
                   ": the small-message allreduce holds at most " + std::to_string(kCapacityBytes) + " bytes");
  const uint64_t epoch = ++epoch_;
  const int parity = static_cast<int>(epoch & 1);
  char* mine = slot(me_, parity);
  std::memcpy(mine + kHeaderOffset, args.header, sizeof(CollectiveHeader));
  if (bytes) std::memcpy(mine + kDataOffset, args.data, bytes);
  flag(me_, parity)->store(epoch, std::memory_order_release);

  AllreduceResult result;
  if (!wait_for_peers(epoch, parity, progress)) {
    // Withdraw: no peer can have completed this epoch (the one in a join never publishes
    // it), so restoring the flag and the epoch leaves the slots as they were before.
    flag(me_, parity)->store(epoch >= 2 ? epoch - 2 : 0, std::memory_order_release);
    --epoch_;
    result.join_instead = true;
    return result;
  }
  if (!check_headers(parity, progress)) {
    result.negotiate = true;  // every rank read the same headers: all negotiate
    return result;
  }

  if (args.count == 0) {
    result.finite_known = args.check_finite;
    return result;
  }
  // Every rank folds the same inputs in the same (local-rank) order: bitwise equal results.
  for (int q = 0; q < local_size_; ++q) inputs_[q] = slot(q, parity) + kDataOffset;
  const ReduceInputs reduce{inputs_.data(), local_size_, args.op, args.divisor, nullptr, 0};
  const bool fused_finite = args.check_finite && (args.dtype == DType::kFloat32 || args.dtype == DType::kFloat64);
  bool finite = true;
  reduce_n(args.data, args.count, args.dtype, reduce, fused_finite ? &finite : nullptr);
  if (fused_finite) {
    result.finite_known = true;
    result.finite = finite;
  }
  node_.count_shm_bytes(bytes);
  return result;
}

bool SmallAllreduce::wait_for_peers(uint64_t epoch, int parity, const Progress& progress) {
  // Spin for at most this long before yielding (none when the node is oversubscribed), and
  // nap between polls once the wait has lasted this long.
  const auto spin_for = std::chrono::microseconds(oversubscribed_ ? 0 : 20);
  const auto nap_after = std::chrono::milliseconds(2);
  const Clock::time_point start = Clock::now();
  bool reported = false;
  int next = 0;  // peers below `next` (in local-rank order) have arrived
  for (uint64_t poll = 0;; ++poll) {
    while (next < local_size_ && flag(next, parity)->load(std::memory_order_acquire) >= epoch) ++next;
    if (next == local_size_) return true;
    if (!oversubscribed_ && (poll & 15) != 15) {
      cpu_relax();
      continue;
    }
    const Clock::time_point now = Clock::now();
    const auto waited = now - start;
    if (waited < spin_for) continue;
    const bool aborted = aborted_.load() || node_.world().aborted();
    const bool late = progress.expired(now);
    if (waited >= std::chrono::microseconds(200) || aborted || late) {
      std::vector<int> missing;
      int first_missing = -1;
      for (int q = 0; q < local_size_; ++q) {
        if (flag(q, parity)->load(std::memory_order_acquire) >= epoch) continue;
        if (first_missing < 0) first_missing = q;
        missing.push_back(node_.node_world_ranks()[q]);
      }
      if (missing.empty()) return true;
      // A late peer that sent a join header is in a collective of another kind or size.
      if (!reported || (poll & 255) == 255) {
        for (int q = 0; q < local_size_; ++q) {
          if (flag(q, parity)->load(std::memory_order_acquire) >= epoch) continue;
          int pending = 0;
          MPI_Status status;
          node_.world().check(MPI_Iprobe(node_.node_world_ranks()[q], node_.world().header_tag(), node_.world().comm(),
                                         &pending, &status),
                              "MPI_Iprobe (small-message allreduce)");
          if (pending) return false;  // it joins by message: withdraw and join the same way
        }
      }
      if (!reported) progress.report(progress.describe() + ": small-message allreduce", missing);
      reported = true;
      if (aborted || late) {
        std::ostringstream message;
        message << "rank " << node_.world().rank() << ": " << progress.describe() << ": small-message allreduce"
                << (aborted ? " was aborted (engine shutting down)" : " timed out") << "; waiting for rank"
                << (missing.size() == 1 ? " " : "s ");
        for (size_t i = 0; i < missing.size(); ++i) message << (i ? ", " : "") << missing[i];
        throw CollectiveTimeoutError(message.str(), missing);
      }
    }
    if (waited < nap_after) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

bool SmallAllreduce::check_headers(int parity, const Progress& progress) {
  std::vector<CollectiveHeader>& headers = headers_;
  std::memcpy(&headers[0], slot(0, parity) + kHeaderOffset, sizeof(CollectiveHeader));
  const CollectiveHeader& first = headers[0];
  int differs = -1;
  const bool order = false;  // names agree below: the ranks stay in step after a mismatch
  for (int q = 1; q < local_size_; ++q) {
    std::memcpy(&headers[q], slot(q, parity) + kHeaderOffset, sizeof(CollectiveHeader));
    if (differs < 0 && !same_call(headers[q], first)) differs = q;
  }
  if (differs < 0) return true;
  for (int q = 1; q < local_size_; ++q)
    if (!same_name(headers[q], first)) return false;  // different names: negotiate
  const std::vector<int>& world_of = node_.node_world_ranks();
  std::ostringstream message;
  message << "rank " << node_.world().rank() << ": ranks called different collectives";
  if (order) message << " (they disagree on the order of collectives)";
  message << "; rank " << world_of[differs] << " differs from rank " << world_of[0] << ":";
  for (int q = 0; q < local_size_; ++q) message << "\n  rank " << world_of[q] << ": " << describe_header(headers[q]);
  message << "\nEvery rank must issue the same collectives, in the same order, with the same name, "
             "dtype, element count and options.";
  throw CollectiveMismatchError(message.str(), order);
}

}  // namespace pbm
