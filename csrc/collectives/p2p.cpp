#include "p2p.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <sstream>
#include <thread>

namespace pbm {

namespace {
constexpr uint32_t kMessageMagic = 0x50325031;  // "P2P1"
constexpr int32_t kNoticeMagic = 0x4e4f5431;     // "NOT1"
constexpr int kTagNotice = 3;                    // timeout notices (see p2p.h)
constexpr int kTagBase = 16;                     // header/payload tags start here

std::string shape_text(DType dtype, const int64_t* dims, int ndim) {
  std::ostringstream text;
  text << dtype_name(dtype) << " [";
  for (int i = 0; i < ndim; ++i) text << (i ? ", " : "") << dims[i];
  text << "]";
  return text.str();
}

std::string ranks_text(const std::vector<int>& ranks) {
  std::ostringstream text;
  text << "rank" << (ranks.size() == 1 ? " " : "s ");
  for (size_t i = 0; i < ranks.size(); ++i) text << (i ? ", " : "") << ranks[i];
  return text.str();
}

size_t product(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}
}  // namespace

static bool mpi_alive() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return !finalized;
}

void P2PRequest::cancel_receives() {
  if (!is_recv || !mpi_alive()) return;
  for (MPI_Request& r : requests) {
    if (r == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&r);
    MPI_Wait(&r, MPI_STATUS_IGNORE);
  }
}

P2PRequest::~P2PRequest() {
  cancel_receives();
  bool pending = false;
  for (MPI_Request& r : requests) {
    if (r == MPI_REQUEST_NULL) continue;
    pending = true;
    if (mpi_alive()) MPI_Request_free(&r);
  }
  if (pending) header.release();  // MPI may still read (or, after finalize, touch) it
}

std::string P2PRequest::describe(int world_peer) const {
  std::ostringstream text;
  text << (is_recv ? "recv" : "send") << " '" << name << "' " << (is_recv ? "from" : "to") << " rank "
       << world_peer << " (" << shape_text(dtype, shape.data(), static_cast<int>(shape.size())) << ")";
  return text.str();
}

PointToPoint::PointToPoint(MPI_Comm comm, double timeout_s) : transport_(comm), timeout_s_(timeout_s) {
  if (!(timeout_s > 0)) throw PbmError("point-to-point: timeout_s must be positive");
}

PointToPoint::~PointToPoint() = default;

int PointToPoint::mpi_tag(int tag, bool payload) const {
  if (tag < 0 || tag >= kMaxMessageTag)
    throw PbmError("rank " + std::to_string(transport_.world_rank(rank())) + ": message tag " +
                   std::to_string(tag) + " outside [0, " + std::to_string(kMaxMessageTag) + ")");
  return kTagBase + 2 * tag + (payload ? 1 : 0);
}

void PointToPoint::check_peer(int peer, const char* what) const {
  if (peer < 0 || peer >= size() || peer == rank())
    throw PbmError("rank " + std::to_string(transport_.world_rank(rank())) + ": " + what + " peer " +
                   std::to_string(peer) + " is not another rank of a communicator of " +
                   std::to_string(size()));
}

void PointToPoint::check_not_broken() const {
  if (!broken_.empty())
    throw PbmError("rank " + std::to_string(transport_.world_rank(rank())) +
                   ": point-to-point messaging is unusable after an earlier failure (" + broken_ + ")");
}

std::shared_ptr<P2PRequest> PointToPoint::isend(const void* data, size_t count, DType dtype,
                                                std::vector<int64_t> shape, int dest, int tag,
                                                std::string name) {
  check_not_broken();
  check_peer(dest, "send");
  if (shape.size() > static_cast<size_t>(kMaxMessageDims))
    throw PbmError("send '" + name + "': more than " + std::to_string(kMaxMessageDims) + " dimensions");
  if (product(shape) != count)
    throw PbmError("send '" + name + "': shape does not hold " + std::to_string(count) + " elements");
  auto request = std::make_shared<P2PRequest>();
  request->peer = dest;
  request->tag = tag;
  request->name = std::move(name);
  request->dtype = dtype;
  request->count = count;
  request->shape = std::move(shape);
  MessageHeader& h = *request->header;
  h.magic = kMessageMagic;
  h.dtype = static_cast<int32_t>(dtype);
  h.ndim = static_cast<int32_t>(request->shape.size());
  h.tag = tag;
  h.count = count;
  std::copy(request->shape.begin(), request->shape.end(), h.dims);
  const size_t bytes = count * dtype_size(dtype);
  if (bytes > static_cast<size_t>(INT32_MAX))
    throw PbmError("send '" + request->name + "': messages above 2 GiB are not supported");
  transport_.check(MPI_Isend(request->header.get(), sizeof(MessageHeader), MPI_BYTE, dest, mpi_tag(tag, false),
                             transport_.comm(), &request->requests[0]),
                   "MPI_Isend (header)");
  transport_.check(MPI_Isend(data, static_cast<int>(bytes), MPI_BYTE, dest, mpi_tag(tag, true),
                             transport_.comm(), &request->requests[1]),
                   "MPI_Isend");
  transport_.bytes_sent += bytes + sizeof(MessageHeader);
  return request;
}

std::shared_ptr<P2PRequest> PointToPoint::irecv(void* data, size_t count, DType dtype, std::vector<int64_t> shape,
                                                int source, int tag, std::string name, bool with_header) {
  check_not_broken();
  check_peer(source, "receive");
  if (shape.size() > static_cast<size_t>(kMaxMessageDims) || product(shape) != count)
    throw PbmError("recv '" + name + "': shape does not hold " + std::to_string(count) + " elements");
  const size_t bytes = count * dtype_size(dtype);
  if (bytes > static_cast<size_t>(INT32_MAX))
    throw PbmError("recv '" + name + "': messages above 2 GiB are not supported");
  auto request = std::make_shared<P2PRequest>();
  request->is_recv = true;
  request->with_header = with_header;
  request->peer = source;
  request->tag = tag;
  request->name = std::move(name);
  request->dtype = dtype;
  request->count = count;
  request->shape = std::move(shape);
  if (with_header) {
    transport_.check(MPI_Irecv(request->header.get(), sizeof(MessageHeader), MPI_BYTE, source, mpi_tag(tag, false),
                               transport_.comm(), &request->requests[0]),
                     "MPI_Irecv (header)");
  }
  transport_.check(MPI_Irecv(data, static_cast<int>(bytes), MPI_BYTE, source, mpi_tag(tag, true),
                             transport_.comm(), &request->requests[1]),
                   "MPI_Irecv");
  return request;
}

void PointToPoint::validate_header(const P2PRequest& request, const MessageHeader& header) const {
  const int me = transport_.world_rank(rank());
  const int peer = transport_.world_rank(request.peer);
  if (header.magic != kMessageMagic || header.ndim < 0 || header.ndim > kMaxMessageDims) {
    throw CollectiveMismatchError("rank " + std::to_string(me) + ": " + request.describe(peer) +
                                  ": rank " + std::to_string(peer) +
                                  " sent a malformed message header (is every rank running the same "
                                  "pybrain-mpi?)");
  }
  if (!request.with_header) return;
  const bool same = header.dtype == static_cast<int32_t>(request.dtype) &&
                    header.ndim == static_cast<int32_t>(request.shape.size()) &&
                    header.count == request.count &&
                    std::equal(request.shape.begin(), request.shape.end(), header.dims);
  if (!same) {
    std::ostringstream message;
    message << "rank " << me << ": " << request.describe(peer) << ": rank " << peer << " sent "
            << shape_text(static_cast<DType>(header.dtype), header.dims, header.ndim) << " ("
            << header.count << " elements), this rank expected "
            << shape_text(request.dtype, request.shape.data(), static_cast<int>(request.shape.size())) << " ("
            << request.count << " elements)";
    throw CollectiveMismatchError(message.str());
  }
}

void PointToPoint::finish(P2PRequest& request) {
  request.done = true;
  if (request.is_recv && request.with_header) {
    try {
      validate_header(request, *request.header);
    } catch (const PbmError& error) {
      broken_ = error.what();
      throw;
    }
  }
}

std::pair<DType, std::vector<int64_t>> PointToPoint::recv_header(int source, int tag, const std::string& name,
                                                                 double timeout_s) {
  check_not_broken();
  check_peer(source, "receive");
  P2PRequest request;
  request.is_recv = true;
  request.with_header = false;
  request.peer = source;
  request.tag = tag;
  request.name = name;
  transport_.check(MPI_Irecv(request.header.get(), sizeof(MessageHeader), MPI_BYTE, source, mpi_tag(tag, false),
                             transport_.comm(), &request.requests[0]),
                   "MPI_Irecv (header)");
  std::vector<MPI_Request> requests(1, request.requests[0]);
  const Describe what = [&] {
    return "recv header of '" + name + "' from rank " + std::to_string(transport_.world_rank(source));
  };
  const double limit = timeout_s < 0 ? timeout_s_ : timeout_s;
  const Progress progress(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(limit)),
                          what, nullptr);
  try {
    wait_requests(requests, {source}, {true}, progress, limit);
  } catch (...) {
    request.requests[0] = requests[0];
    request.cancel_receives();
    throw;
  }
  request.requests[0] = MPI_REQUEST_NULL;
  validate_header(request, *request.header);
  const MessageHeader& h = *request.header;
  if (h.tag != tag) throw CollectiveMismatchError("recv header of '" + name + "': tag mismatch");
  std::vector<int64_t> shape(h.dims, h.dims + h.ndim);
  if (product(shape) != h.count) {
    throw CollectiveMismatchError("rank " + std::to_string(transport_.world_rank(rank())) +
                                  ": recv header of '" + name + "' from rank " +
                                  std::to_string(transport_.world_rank(source)) +
                                  ": the shape does not hold the element count");
  }
  switch (static_cast<DType>(h.dtype)) {
    case DType::kFloat32: case DType::kFloat64: case DType::kFloat16: case DType::kBFloat16:
    case DType::kInt32: case DType::kInt64: break;
    default:
      throw CollectiveMismatchError("recv header of '" + name + "': unknown dtype code " +
                                    std::to_string(h.dtype));
  }
  return {static_cast<DType>(h.dtype), std::move(shape)};
}

int PointToPoint::probe_any(int tag, double timeout_s) {
  check_not_broken();
  const int mpi_header_tag = mpi_tag(tag, false);
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(std::max(0.0, timeout_s)));
  // Short sleeps first (a busy server answers within microseconds), then up to 1 ms so an idle
  // server does not spin a core that oversubscribed workers need.
  auto pause = std::chrono::microseconds(20);
  while (!transport_.aborted()) {
    int flag = 0;
    MPI_Status status;
    transport_.check(MPI_Iprobe(MPI_ANY_SOURCE, mpi_header_tag, transport_.comm(), &flag, &status),
                     "MPI_Iprobe");
    if (flag) return status.MPI_SOURCE;
    if (Clock::now() >= until) break;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
  return -1;
}

bool PointToPoint::test(P2PRequest& request) {
  if (request.done) return true;
  for (MPI_Request& r : request.requests) {
    if (r == MPI_REQUEST_NULL) continue;
    int flag = 0;
    transport_.check(MPI_Test(&r, &flag, MPI_STATUS_IGNORE), "MPI_Test");
    if (!flag) return false;
  }
  finish(request);
  return true;
}

void PointToPoint::wait(P2PRequest& request, double timeout_s) {
  if (request.done) return;
  check_not_broken();
  const int world_peer = transport_.world_rank(request.peer);
  const Describe what = [&] { return request.describe(world_peer); };
  const double limit = timeout_s < 0 ? timeout_s_ : timeout_s;
  const Progress progress(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(limit)),
                          what, nullptr);
  std::vector<MPI_Request> requests(request.requests, request.requests + 2);
  try {
    wait_requests(requests, {request.peer, request.peer}, {request.is_recv, request.is_recv}, progress, limit);
  } catch (...) {
    // Still pending: receives are cancelled now, sends stay with the request (its destructor).
    request.requests[0] = requests[0];
    request.requests[1] = requests[1];
    request.cancel_receives();
    throw;
  }
  request.requests[0] = request.requests[1] = MPI_REQUEST_NULL;
  finish(request);
}

void PointToPoint::wait_requests(std::vector<MPI_Request>& requests, const std::vector<int>& peers,
                                 const std::vector<bool>& is_recv, const Progress& progress, double limit_s) {
  try {
    // Not cancellable here: the caller owns the requests and their buffers (see wait).
    transport_.wait_all(requests, peers, is_recv, progress, /*cancellable=*/false);
  } catch (const CollectiveTimeoutError& error) {
    broken_ = error.what();
    if (transport_.aborted()) throw;
    blame(error, progress, limit_s);
  }
}

void PointToPoint::blame(const CollectiveTimeoutError& error, const Progress& progress, double limit_s) {
  const int me = transport_.world_rank(rank());
  const std::vector<int>& waited = error.missing_ranks();  // world ranks
  // Tell every other rank whom this one waits for.
  std::array<int32_t, 4 + kMaxMessageDims> notice{};
  notice[0] = kNoticeMagic;
  notice[1] = me;
  const size_t n = std::min(waited.size(), notice.size() - 3);
  notice[2] = static_cast<int32_t>(n);
  for (size_t i = 0; i < n; ++i) notice[3 + i] = waited[i];
  notices_out_.push_back(notice);
  for (int r = 0; r < size(); ++r) {
    if (r == rank()) continue;
    MPI_Request request = MPI_REQUEST_NULL;
    // The buffer stays in notices_out_ (the request is released, MPI completes it when it can).
    if (MPI_Isend(notices_out_.back().data(), static_cast<int>(notice.size()), MPI_INT32_T, r, kTagNotice,
                  transport_.comm(), &request) == MPI_SUCCESS)
      MPI_Request_free(&request);
  }
  // Collect the others' notices for a grace period (half the wait's timeout, 1 to 10 s): the
  // other waits of a stuck pipeline started within a micro-batch of this one.
  const double grace_s = std::min(10.0, std::max(1.0, 0.5 * limit_s));
  std::map<int, std::vector<int>> waits_for;  // world rank -> world ranks it waits for
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(grace_s));
  for (uint64_t spin = 0; Clock::now() < until; ++spin) {
    int flag = 0;
    MPI_Status status;
    MPI_Iprobe(MPI_ANY_SOURCE, kTagNotice, transport_.comm(), &flag, &status);
    if (flag) {
      std::array<int32_t, 4 + kMaxMessageDims> in{};
      MPI_Recv(in.data(), static_cast<int>(in.size()), MPI_INT32_T, status.MPI_SOURCE, kTagNotice,
               transport_.comm(), MPI_STATUS_IGNORE);
      if (in[0] == kNoticeMagic && in[2] >= 0 && in[2] <= static_cast<int32_t>(in.size()) - 3)
        waits_for[in[1]] = std::vector<int>(in.begin() + 3, in.begin() + 3 + in[2]);
      continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  // Follow the waits from this rank's peers: the ranks reached that sent no notice are at fault.
  std::vector<int> culprits;
  std::vector<std::string> chain;
  std::set<int> seen{me};
  std::vector<int> frontier = waited;
  while (!frontier.empty()) {
    std::vector<int> next;
    for (int r : frontier) {
      if (!seen.insert(r).second) continue;
      auto found = waits_for.find(r);
      if (found == waits_for.end()) {
        culprits.push_back(r);
        continue;
      }
      std::vector<int> onward;
      for (int q : found->second)
        if (q != me) onward.push_back(q);
      chain.push_back("rank " + std::to_string(r) + " was itself waiting for " + ranks_text(found->second));
      next.insert(next.end(), onward.begin(), onward.end());
    }
    frontier = std::move(next);
  }
  std::sort(culprits.begin(), culprits.end());
  std::ostringstream message;
  message << "rank " << me << ": " << progress.describe() << " timed out; ";
  if (culprits.empty()) {
    // Everyone reached is waiting too: a cycle (mismatched sends and receives), or peers that
    // gave up on this rank first. Name the direct peers.
    culprits = waited;
    message << "waiting for " << ranks_text(waited) << " (no rank outside the waits: ";
  } else {
    message << "waiting for " << ranks_text(culprits) << " (";
  }
  if (chain.empty()) {
    message << (culprits.size() == 1 ? "it" : "they")
            << " reported no wait of " << (culprits.size() == 1 ? "its" : "their")
            << " own: stopped, killed or busy outside pybrain-mpi)";
  } else {
    for (size_t i = 0; i < chain.size(); ++i) message << (i ? "; " : "") << chain[i];
    message << ")";
  }
  broken_ = message.str();
  throw CollectiveTimeoutError(message.str(), culprits);
}

}  // namespace pbm
