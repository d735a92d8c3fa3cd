// Point-to-point plumbing shared by every collective algorithm: a duplicated MPI
// communicator, persistent scratch memory, and waits that poll against a deadline.
//
// Every blocking wait in the core goes through Transport::wait_all, so no collective can
// hang silently: past the deadline (or when the engine is shutting down) it cancels what
// it can and throws CollectiveTimeoutError naming the peers it was still waiting for.
#pragma once

#include <mpi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../common/errors.h"
#include "progress.h"

namespace pbm {

// Message tags. Each collective's messages use their own tag so a header of the next
// collective can arrive early without being mistaken for data (MPI matches by tag and
// keeps order per sender and tag, which the chunked ring relies on).
// The join headers and negotiation lists use tags of their own transport's lifetime
// (Transport::header_tag): MPICH reuses a freed communicator's context for the next one, so
// a header an aborted engine sent a peer (still unreceived there) could otherwise be taken
// for the first header of the engine that pybrain_mpi.init() makes next.
enum Tag : int { kTagRing = 17002, kTagBroadcast = 17003, kTagThreeLC = 17010 };
constexpr int kTagControlBase = 20000;  // header and negotiation tags: 20000 .. 27999
constexpr int kControlEpochs = 4000;

// Persistent scratch slots of a transport, one per user, so no two phases of a collective
// hand out the same memory.
enum ScratchSlot : size_t {
  kScratchJoinSend = 0,   // handshake.cpp: our header (+ inline payload)
  kScratchJoinRecv = 1,   // handshake.cpp: every peer's
  kScratchRing = 2,       // ring_allreduce.cpp: the receive window
  kScratchWiden = 3,      // engine.cpp: 16-bit inputs widened to float32
  kScratchFold = 4,       // join_allreduce.cpp: the inline allreduce's accumulator
  kScratchThreeLCSend = 5,  // compressed_allreduce.cpp: encoded partitions
  kScratchThreeLCRecv = 6,
  kScratchThreeLCSum = 7,   // compressed_allreduce.cpp: the owned partition's float32 sum
  kScratchNegotiateSend = 8,  // negotiation.cpp: our list of pending collectives
  kScratchNegotiateRecv = 9,  // negotiation.cpp: every peer's
};

class Transport {
 public:
  // Duplicates `comm` (collective over it) so pybrain-mpi traffic never matches user
  // messages, and makes MPI errors return codes instead of aborting.
  explicit Transport(MPI_Comm comm);
  ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  MPI_Comm comm() const { return comm_; }
  // Tags of the join headers and of the negotiation lists: distinct for each transport made
  // over the same ranks (their number, agreed at construction, modulo kControlEpochs).
  int header_tag() const { return kTagControlBase + 2 * static_cast<int>(epoch_ % kControlEpochs); }
  int negotiate_tag() const { return header_tag() + 1; }
  int rank() const { return rank_; }
  int size() const { return size_; }

  // Raises PbmError with MPI's error string when rc is not MPI_SUCCESS.
  void check(int rc, const char* what) const;

  // Polls `requests` until all complete. `peers[i]` is the rank request i talks to and
  // `is_recv[i]` whether it is a receive (receives are cancelled on failure). Throws
  // CollectiveTimeoutError at the progress's deadline or when abort() was called, and
  // PeerFailureError naming the pending peers when MPI fails the wait (a peer died).
  // `cancellable` false leaves requests untouched on failure: MPI forbids freeing or
  // cancelling the request of a non-blocking collective.
  void wait_all(std::vector<MPI_Request>& requests, const std::vector<int>& peers,
                const std::vector<bool>& is_recv, const Progress& progress, bool cancellable = true);

  // Polls one request; on completion returns the MPI_Status.
  MPI_Status wait_one(MPI_Request& request, int peer, bool is_recv, const Progress& progress);

  // Makes every wait in progress (and later) give up promptly: used at shutdown.
  void abort() { aborted_.store(true); }
  bool aborted() const { return aborted_.load(); }

  // Persistent scratch: grows, never shrinks, so large collectives do not pay page
  // faults on every call (MPICH loses half its large-message speed to exactly that).
  char* scratch(size_t slot, size_t bytes);

  // Every wait spins briefly and then yields its core. Waits on the progress thread also
  // nap once they have lasted a while: on machines where every core also runs a training
  // process, a busy-polling progress thread would steal the cycles of the backward pass it
  // is meant to overlap.
  static void set_polite_polling_for_this_thread(bool polite);
  // More ranks on the node than CPUs (small_allreduce.h: node_oversubscribed): every wait
  // yields its core from its first back-off on, since the peer it waits for may need it.
  static void set_oversubscribed(bool oversubscribed);
  // Spin-then-yield back-off for waits outside MPI (the shared-memory flags); called every
  // 64 polls like the MPI waits' own.
  static void back_off_for_this_thread(uint64_t spin);

  // For a transport over a sub-communicator (the hierarchical allreduce's slice rings):
  // world rank of each of its ranks, so messages and missing-rank lists speak world ranks.
  void set_world_ranks(std::vector<int> world_of);
  int world_rank(int peer) const { return world_of_.empty() ? peer : world_of_[peer]; }

  // Bytes this rank handed to MPI sends since start (for "bytes communicated" reports).
  std::atomic<uint64_t> bytes_sent{0};

 private:
  void cancel_pending(std::vector<MPI_Request>& requests, const std::vector<bool>& is_recv);
  // An MPI call of a wait failed: PeerFailureError naming the peers still pending.
  [[noreturn]] void throw_peer_failure(int rc, const char* call, const std::vector<MPI_Request>& pending,
                                       const std::vector<int>& peers, const Progress& progress) const;
  [[noreturn]] void throw_timeout(const std::vector<MPI_Request>& requests,
                                  const std::vector<int>& peers, const Progress& progress,
                                  bool aborted);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  uint64_t epoch_ = 0;
  std::vector<int> world_of_;
  std::atomic<bool> aborted_{false};
  std::vector<std::unique_ptr<char[]>> scratch_;
  std::vector<size_t> scratch_bytes_;
};

}  // namespace pbm
