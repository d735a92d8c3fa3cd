// The engine owns pybrain-mpi's communicator and its one background progress thread.
//
// Collectives execute one at a time, in submission order, on every rank. Asynchronous
// calls are queued for the progress thread; a blocking call made while nothing is queued
// runs directly on the calling thread (GIL released by the bindings), which keeps small
// allreduces at MPI latency instead of paying a thread hand-off.
#pragma once

#include <mpi.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "collective.h"
#include "compressed_allreduce.h"
#include "handshake.h"
#include "ring_allreduce.h"
#include "shm_allreduce.h"
#include "transport.h"

namespace pbm {

// One submitted collective; shared by the engine and the Python handle that waits on it.
class Operation {
 public:
  Operation(CollectiveSpec spec, uint64_t seq) : spec_(std::move(spec)), seq_(seq) {}

  const CollectiveSpec& spec() const { return spec_; }
  uint64_t seq() const { return seq_; }
  // "allreduce #12 'fc1.weight' (float32 x 1000, op=sum, algorithm=ring)"
  std::string describe() const;

  // Blocks until the collective finished (successfully or not) or timeout_s passed
  // (negative: no limit). Returns whether it finished. Does not throw its error.
  bool wait(double timeout_s);
  bool done() const;
  // Throws the collective's error, if it failed.
  void rethrow_if_failed() const;

  ProgressStatus& status() { return status_; }
  void finish(std::exception_ptr error);

  // check_finite collectives: 1 when every element of the result is finite, 0 when not,
  // -1 when not asked for (or not finished).
  int finite() const { return finite_.load(); }
  void set_finite(bool finite) { finite_.store(finite ? 1 : 0); }

 private:
  CollectiveSpec spec_;
  uint64_t seq_;
  ProgressStatus status_;
  mutable std::mutex mu_;
  std::condition_variable finished_cv_;
  bool finished_ = false;
  std::exception_ptr error_;
  std::atomic<int> finite_{-1};
};

class Engine {
 public:
  // Collective over `comm` (it is duplicated). `timeout_s` bounds every collective even
  // when nobody waits on it (PBM_TIMEOUT_S); `progress_thread` false executes async
  // collectives at submission (for MPI libraries without MPI_THREAD_MULTIPLE).
  Engine(MPI_Comm comm, double timeout_s, bool progress_thread);
  ~Engine();

  int rank() const { return transport_.rank(); }
  int size() const { return transport_.size(); }

  // Queues a collective for the progress thread.
  std::shared_ptr<Operation> submit(CollectiveSpec spec);
  // Executes a collective and returns when it is done; throws its error. timeout_s < 0
  // uses the engine's timeout.
  void run(CollectiveSpec spec, double timeout_s);

  // Stops the progress thread. Queued collectives fail; one stuck in MPI is aborted.
  void shutdown();

  RingAllreduce& ring() { return ring_; }
  uint64_t bytes_sent() const {
    return transport_.bytes_sent.load() + (node_ ? node_->bytes_sent() : 0);
  }

  // Sets up the shared-memory node stage (algorithms shm/hierarchical/auto). Collective over
  // the communicator; call once, before any collective. `node_color`: the same value on all
  // ranks of a node (pybrain_mpi passes the node's lowest rank).
  void configure_nodes(int node_color);
  NodeStage* node() { return node_.get(); }
  uint64_t shm_bytes() const { return node_ ? node_->shm_bytes() : 0; }
  // algorithm "auto" uses the node stage from this many bytes on (PBM_SHM_MIN_BYTES);
  // smaller messages go to the ring (which carries them inside the join message).
  size_t shm_min_bytes = 64 * 1024;
  // The algorithm an allreduce of `bytes` with `requested` runs as on this topology.
  Algorithm resolve_algorithm(Algorithm requested, size_t bytes) const;
  double timeout_s() const { return timeout_s_; }

 private:
  void validate(const CollectiveSpec& spec) const;
  std::shared_ptr<Operation> make_operation(CollectiveSpec spec);
  void progress_loop();
  void execute(Operation& op, Clock::time_point deadline);
  void execute_allreduce(Operation& op, Clock::time_point deadline);
  void execute_broadcast(Operation& op, Clock::time_point deadline);
  // Zero-copy: window and offset of the buffer if every node rank's lies at the same place.
  void zero_copy_target(const void* data, size_t bytes, CollectiveHeader* header) const;
  int32_t agreed_zero_copy_window(size_t bytes, uint64_t* offset) const;
  void mark_broken(const std::string& reason);
  void throw_if_broken() const;
  Clock::time_point deadline_after(double timeout_s) const;

  Transport transport_;
  Handshake handshake_;
  RingAllreduce ring_;
  CompressedAllreduce compressed_;
  std::unique_ptr<NodeStage> node_;
  double timeout_s_;

  mutable std::mutex mu_;
  std::condition_variable queue_cv_;
  std::deque<std::shared_ptr<Operation>> queue_;
  bool executing_ = false;
  bool stopping_ = false;
  uint64_t next_seq_ = 0;
  std::string broken_reason_;
  std::thread progress_thread_;
};

}  // namespace pbm
