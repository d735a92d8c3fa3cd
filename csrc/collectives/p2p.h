// Point-to-point messages between two ranks (pipeline stages), with the engine's deadlines.
//
// A message is a small header (magic, dtype, shape, element count) followed by the payload,
// both sent non-blocking on a duplicated communicator of their own, so they never match the
// engine's collectives or user traffic. The receiver either declares what it expects (dtype
// and shape: a mismatch raises CollectiveMismatchError naming both ranks and the message) or
// learns it from the header first (recv_header, then a payload-only irecv).
//
// Every wait polls against a deadline through Transport::wait_all. When it expires, the rank
// does not simply blame the peer it waits for: in a pipeline that peer is often waiting
// itself (stage 0 waits for stage 1, which waits for the stopped stage 2). The rank sends a
// small notice to every rank ("I, rank r, wait for ranks ...") and collects the others' for a
// grace period; following the chain of waits from its own peers, the ranks it reaches that
// sent no notice are the ones at fault (stopped, killed or stuck outside pybrain-mpi), and the
// CollectiveTimeoutError names them.
//
// The core knows buffers (pointer, count, dtype) and shapes as integer lists only.
#pragma once

#include <mpi.h>

#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../common/dtype.h"
#include "transport.h"

namespace pbm {

constexpr int kMaxMessageDims = 8;
// User tags are [0, kMaxMessageTag); each uses two MPI tags (header, payload).
constexpr int kMaxMessageTag = 1 << 20;

struct MessageHeader {
  uint32_t magic = 0;
  int32_t dtype = 0;
  int32_t ndim = 0;
  int32_t tag = 0;
  uint64_t count = 0;
  int64_t dims[kMaxMessageDims] = {};
};

// One posted send or receive; the Python side keeps the buffer alive until it is waited for.
class P2PRequest {
 public:
  bool is_recv = false;
  bool with_header = true;  // receives: the header is part of this request
  int peer = 0;             // rank in the point-to-point communicator
  int tag = 0;
  std::string name;
  DType dtype = DType::kFloat32;
  size_t count = 0;
  std::vector<int64_t> shape;  // sends: what is sent; receives: what is expected
  // Sends: ours; receives: the sender's, once arrived. On the heap: a send still pending when
  // the request is dropped (after a failure) keeps it, as MPI may read it later.
  std::unique_ptr<MessageHeader> header{new MessageHeader()};
  MPI_Request requests[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};  // header, payload
  bool done = false;

  P2PRequest() = default;
  P2PRequest(const P2PRequest&) = delete;
  P2PRequest& operator=(const P2PRequest&) = delete;
  // A request dropped before it completed (its wait failed, or was never called): pending
  // receives are cancelled and completed (MPI guarantees that wait returns), pending sends
  // released to MPI, and their header left allocated.
  ~P2PRequest();
  // Cancels and completes pending receives now (so their buffers may be freed).
  void cancel_receives();
  // "send 'act mb 3' to rank 2 (float32 [4, 16])"
  std::string describe(int world_peer) const;
};

class PointToPoint {
 public:
  // Collective over `comm` (duplicated). `timeout_s` is the default deadline of a wait.
  PointToPoint(MPI_Comm comm, double timeout_s);
  ~PointToPoint();
  PointToPoint(const PointToPoint&) = delete;
  PointToPoint& operator=(const PointToPoint&) = delete;

  int rank() const { return transport_.rank(); }
  int size() const { return transport_.size(); }
  double timeout_s() const { return timeout_s_; }
  uint64_t bytes_sent() const { return transport_.bytes_sent.load(); }
  // World rank of each rank of the communicator, for messages (default: the same numbers).
  void set_world_ranks(std::vector<int> world_of) { transport_.set_world_ranks(std::move(world_of)); }

  std::shared_ptr<P2PRequest> isend(const void* data, size_t count, DType dtype,
                                    std::vector<int64_t> shape, int dest, int tag, std::string name);
  // Posts the receive of a message whose dtype and shape are declared (checked at wait);
  // with_header false: the header was already taken by recv_header.
  std::shared_ptr<P2PRequest> irecv(void* data, size_t count, DType dtype, std::vector<int64_t> shape,
                                    int source, int tag, std::string name, bool with_header);
  // Waits for the next header from `source` on `tag`; returns the sender's dtype and shape.
  std::pair<DType, std::vector<int64_t>> recv_header(int source, int tag, const std::string& name,
                                                     double timeout_s);
  // Waits until the request completes; timeout_s < 0: the default. Raises
  // CollectiveTimeoutError naming the ranks at fault, CollectiveMismatchError when the
  // sender's dtype/shape differ from the declared ones.
  void wait(P2PRequest& request, double timeout_s);
  // Whether the request completed (never blocks; validates like wait on completion).
  bool test(P2PRequest& request);

  // Waits (polling, up to timeout_s) for the next header on `tag` from any other rank; returns
  // that rank (then take the message with recv_header(source, tag) and irecv), or -1 when
  // nothing came in time or the messaging was aborted. A server's loop: no peer is at fault
  // when none writes, so a timeout here neither blames nor breaks the messaging.
  int probe_any(int tag, double timeout_s);

  // Makes every wait give up promptly (shutdown).
  void abort() { transport_.abort(); }

 private:
  int mpi_tag(int tag, bool payload) const;
  void check_peer(int peer, const char* what) const;
  void check_not_broken() const;
  void validate_header(const P2PRequest& request, const MessageHeader& header) const;
  void finish(P2PRequest& request);
  // Waits for `requests` (talking to comm ranks `peers`); on a deadline resolves who is at
  // fault with the other ranks' notices and rethrows.
  void wait_requests(std::vector<MPI_Request>& requests, const std::vector<int>& peers,
                     const std::vector<bool>& is_recv, const Progress& progress, double limit_s);
  [[noreturn]] void blame(const CollectiveTimeoutError& error, const Progress& progress, double limit_s);

  Transport transport_;
  double timeout_s_;
  std::string broken_;
  std::deque<std::array<int32_t, 4 + kMaxMessageDims>> notices_out_;  // notices in flight
};

}  // namespace pbm
