// The small-message allreduce of one node (algorithm "small"; "auto" below
// PBM_SMALL_MAX_BYTES, 64 KiB, when every rank is on one node).
//
// A flag-based shared-memory allreduce in the spirit of the "symmetric naive" small-message
// paths of DeepSpeed's and Gloo's shared-memory allreduces (our own design): every rank owns
// two slots of a shared window. Call e writes slot e % 2: the caller's join header (what the
// handshake would have sent) and its input, then publishes e in the slot's flag (release).
// Every rank waits for every peer's flag to read e (acquire), checks that all headers agree,
// and reduces the n inputs itself, in local-rank order: every rank computes bitwise the same
// result, and nothing else travels. There is no join message and no second sync.
//
// Why two slots are enough: a rank writes slot e % 2 again only at call e + 2, after it read
// every peer's call e + 1; a peer writes call e + 1 only after it finished reading call e.
//
// Mismatch and deadlines:
//   - Headers in the slots disagree (size, dtype, op, algorithm, name, order): every rank
//     reads the same headers and raises the same CollectiveMismatchError, naming the rank
//     that differs; the calls stay in step (an order mismatch breaks the engine, as a join's).
//   - A peer that runs a collective with a join instead (a size above the threshold, a
//     barrier): its join header waits in our queue while its slot does not reach e. The wait
//     probes for it once it is slow and raises CollectiveMismatchError naming that rank.
//   - A peer that never arrives (stopped, crashed): CollectiveTimeoutError at the
//     collective's deadline, naming it, like every other wait.
//
// Waiting: a short spin (the peer is usually a few hundred ns behind), then sched_yield, then
// naps once the wait is long. With more ranks on the node than CPUs this process may run on,
// the spin is skipped: a spinning rank would hold the core the rank it waits for needs.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "allreduce.h"
#include "handshake.h"
#include "node_stage.h"

namespace pbm {

// Whether more ranks share this node than there are CPUs this process may run on
// (sched_getaffinity): waits then yield their core at once instead of spinning.
bool node_oversubscribed(int local_size);

class SmallAllreduce : public AllreduceAlgorithm {
 public:
  // Largest message the slots hold (PBM_SMALL_MAX_BYTES may lower the threshold, not raise it).
  static constexpr size_t kCapacityBytes = 64 * 1024;

  // Collective over the node: allocates the slots' window. Only for one node with several ranks.
  explicit SmallAllreduce(NodeStage& node);
  const char* name() const override { return "small"; }
  bool enabled(const AllreduceArgs& args) const override { return args.algorithm == Algorithm::kSmall; }
  // The slots carry the headers: no join message.
  JoinRequest join(const AllreduceArgs& args) const override {
    JoinRequest request;
    request.self_joined = true;
    return request;
  }
  AllreduceResult run(const AllreduceArgs& args, const Progress& progress) override;
  void abort() override { aborted_.store(true); }

 private:
  char* slot(int local_rank, int parity) const;
  std::atomic<uint64_t>* flag(int local_rank, int parity) const;
  // True once every node rank has published this epoch; false when a missing peer sent a
  // join header instead (it is in another collective: the caller withdraws).
  bool wait_for_peers(uint64_t epoch, int parity, const Progress& progress);
  // True when every rank proposed the same call; false when the names differ (the engine
  // negotiates); throws CollectiveMismatchError for one name with different descriptions.
  bool check_headers(int parity, const Progress& progress);

  NodeStage& node_;
  int me_;
  int local_size_;
  bool oversubscribed_;
  size_t slot_bytes_;
  SharedWindow window_;  // mapped for the engine's life (see shared_pool.h)
  uint64_t epoch_ = 0;   // small allreduces so far (the same on every node rank)
  std::vector<const void*> inputs_;
  std::vector<CollectiveHeader> headers_;  // check_headers' copies, by local rank
  std::atomic<bool> aborted_{false};
};

}  // namespace pbm
