// The join step every collective starts with: each rank sends a small header describing
// the collective it is about to run (sequence number, kind, dtype, count, op, algorithm,
// compression, root, name)
// to every peer and waits for theirs.
//
// Why all-to-all rather than a tree: it tells each rank exactly which peers have not
// joined when a wait times out (Horovod's "missing ranks"), and every rank sees every
// header, so a mismatch raises the same clear error on all ranks instead of a hang or
// silent memory corruption in the data phase. Small allreduces carry their data in the
// same message, so for them the join costs nothing extra.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "transport.h"

namespace pbm {

constexpr uint32_t kHeaderMagic = 0x50424d31;  // "PBM1"
constexpr uint32_t kHeaderVersion = 2;
// Largest payload that rides along with a header (see Handshake).
constexpr size_t kMaxInlinePayloadBytes = 64 * 1024;

struct CollectiveHeader {
  uint32_t magic = kHeaderMagic;
  uint32_t version = kHeaderVersion;
  uint64_t seq = 0;
  int32_t kind = 0;
  int32_t algorithm = 0;
  int32_t op = 0;
  int32_t dtype = 0;
  uint64_t count = 0;
  int32_t root = 0;
  uint32_t payload_bytes = 0;
  float sparsity = 0.f;  // 3LC sparsity multiplier; 0 when uncompressed
  // Zero-copy node stage: the shared pool window (-1: none) and offset of this rank's
  // buffer. Not part of the agreement: the node ranks fall back to copying when they differ.
  int32_t shm_window = -1;
  char name[64] = {};
  uint64_t shm_offset = 0;
};

class Handshake {
 public:
  explicit Handshake(Transport& transport) : transport_(transport) {}

  // Sends `mine` (+ payload) to all peers and receives theirs. Afterwards header(i) and
  // payload(i) describe rank i (payload(rank) is our own). Throws CollectiveTimeoutError
  // naming the ranks that did not join by `deadline`, and CollectiveMismatchError (on
  // every rank alike) when the headers disagree on anything but the payload.
  void exchange(const CollectiveHeader& mine, const void* payload, const Progress& progress);

  const CollectiveHeader& header(int rank) const { return headers_[rank]; }
  const char* payload(int rank) const { return payloads_[rank]; }

  // True when the last mismatch was in the sequence numbers: ranks disagree on the order
  // of collectives, so later ones cannot be matched either.
  bool order_broken() const { return order_broken_; }

 private:
  void check_agreement(const Progress& progress);

  Transport& transport_;
  std::vector<CollectiveHeader> headers_;
  std::vector<const char*> payloads_;
  bool order_broken_ = false;
};

std::string describe_header(const CollectiveHeader& header);

}  // namespace pbm
