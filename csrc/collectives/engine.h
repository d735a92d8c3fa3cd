// The engine owns pybrain-mpi's communicator and its one background progress thread.
//
// Collectives execute one at a time, in an order every rank agrees on, matched by name:
// every collective has one (given, or its place among this rank's unnamed calls), and the
// k-th pending call of a name on one rank runs with the k-th pending call of that name on the
// others. While the ranks submit in the same order, the join each collective starts with
// (handshake.h) confirms the name and that is all; when the join shows different names, the
// ranks negotiate the order (negotiation.h) on the progress thread. Asynchronous calls are
// queued for the progress thread; a blocking call made while nothing is queued runs directly
// on the calling thread (GIL released by the bindings), which keeps small allreduces at MPI
// latency instead of paying a thread hand-off.
//
// An allreduce is resolved once, at submission: the algorithm table (algorithm_table.h)
// resolves the requested algorithm for this topology and picks its implementation, and a
// 3LC call binds its state's residuals for that path's layout. Execution is then the join
// (handshake.h), the implementation's run(), and the work every algorithm shares
// (allreduce.h: 16-bit widening, the finiteness scan).
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

#include "algorithm_table.h"
#include "allreduce.h"
#include "collective.h"
#include "handshake.h"
#include "negotiation.h"
#include "node_stage.h"
#include "transport.h"

namespace pbm {

// What a collective call asks for.
struct CollectiveSpec {
  CollectiveKind kind = CollectiveKind::kAllreduce;
  AllreduceArgs args;  // buffer, dtype and name of every kind; the rest for allreduce
  int root = 0;        // broadcast only
};

// One submitted collective; shared by the engine and the Python handle that waits on it.
class Operation {
 public:
  // `unnamed`: for a call without a name, its place among this rank's unnamed calls (1, 2,
  // ...), which names it; 0 for a named call. `expires_at`: when it fails if the ranks have
  // not all submitted it (negotiation).
  Operation(CollectiveSpec spec, uint64_t seq, uint64_t unnamed, Clock::time_point expires_at);

  const CollectiveSpec& spec() const { return spec_; }
  // The allreduce as the engine runs it (resolved fields filled in at submission).
  AllreduceArgs& args() { return spec_.args; }
  // The implementation the engine picked for an allreduce (at submission).
  AllreduceAlgorithm* algorithm() const { return algorithm_; }
  void set_algorithm(AllreduceAlgorithm* algorithm) { algorithm_ = algorithm; }
  uint64_t seq() const { return seq_; }
  Clock::time_point expires_at() const { return expires_at_; }
  // The join header: what every rank must agree on, as the caller asked for it.
  const CollectiveHeader& header() const { return header_; }
  // "#12 allreduce 'fc1.weight' (float32 x 1000, op=sum, algorithm=ring)"
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
  Clock::time_point expires_at_;
  AllreduceAlgorithm* algorithm_ = nullptr;
  CollectiveHeader header_;
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

  AlgorithmTable& algorithms() { return algorithms_; }
  uint64_t bytes_sent() const { return transport_.bytes_sent.load() + algorithms_.bytes_sent(); }

  // Sets up the shared-memory node stage (algorithms shm/hierarchical/auto). Collective over
  // the communicator; call once, before any collective. `node_color`: the same value on all
  // ranks of a node (pybrain_mpi passes the node's lowest rank).
  void configure_nodes(int node_color);
  NodeStage* node() { return node_.get(); }
  uint64_t shm_bytes() const { return node_ ? node_->shm_bytes() : 0; }
  double timeout_s() const { return timeout_s_; }
  // Negotiation rounds run so far (0 while every rank submits in the same order).
  uint64_t negotiation_rounds() const { return negotiation_rounds_.load(); }

 private:
  void validate(const CollectiveSpec& spec) const;
  void validate_allreduce(const AllreduceArgs& args, const std::string& where) const;
  AllreduceAlgorithm* plan(AllreduceArgs& args) const;
  std::shared_ptr<Operation> make_operation(CollectiveSpec spec, double timeout_s);
  void progress_loop();
  // Runs `op` and finishes it (successfully or not); returns false, leaving it unfinished,
  // when the join showed that the ranks proposed collectives of different names.
  bool execute(Operation& op, Clock::time_point deadline);
  bool execute_allreduce(Operation& op, const Progress& progress);
  bool join_allreduce(Operation& op, const JoinRequest& request, bool in_place, const Progress& progress);
  // One negotiation round over the oldest pending collectives (progress thread, with
  // executing_ set); returns whether it decided anything.
  bool negotiate();
  // Fails `op`, whose join showed other names, where it cannot be reordered.
  void fail_unordered(Operation& op, const char* why);
  // Zero-copy: where the buffer lies in the pool, if every node rank's lies at the same place.
  ZeroCopyPlacement agreed_placement(size_t bytes) const;
  void mark_broken(const std::string& reason);
  void throw_if_broken() const;
  Clock::time_point deadline_after(double timeout_s) const;

  Transport transport_;
  Handshake handshake_;
  Negotiator negotiator_;
  std::unique_ptr<NodeStage> node_;  // before the table, whose node algorithms refer to it
  AlgorithmTable algorithms_;
  double timeout_s_;

  mutable std::mutex mu_;
  std::condition_variable queue_cv_;
  std::deque<std::shared_ptr<Operation>> queue_;   // pending, in submission order
  std::deque<std::shared_ptr<Operation>> agreed_;  // negotiated: run next, in this order
  bool negotiating_ = false;  // the last join showed different names: negotiate before running more
  bool executing_ = false;
  bool stopping_ = false;
  uint64_t next_seq_ = 0;
  uint64_t next_unnamed_ = 0;
  std::atomic<uint64_t> negotiation_rounds_{0};
  std::string broken_reason_;
  std::thread progress_thread_;
};

}  // namespace pbm
