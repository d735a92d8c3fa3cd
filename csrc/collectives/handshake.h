// The join step every collective starts with: each rank sends a small header describing
// the collective it proposes to run next (its name, kind, dtype, count, op, algorithm,
// compression, root) to every peer and waits for theirs.
//
// Collectives are matched by name (negotiation.h): when every rank proposes the same name,
// which is the steady state of ranks that submit in the same order, the join is all the
// agreement there is and costs nothing beyond it. When the names differ, no data moves and
// the engine negotiates an order every rank agrees on. Same name, different shape: every
// rank raises the same CollectiveMismatch.
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
constexpr uint32_t kHeaderVersion = 5;  // 4: signature, 5: threelc_block
// Largest payload that rides along with a header (see Handshake).
constexpr size_t kMaxInlinePayloadBytes = 64 * 1024;

struct CollectiveHeader {
  uint32_t magic = kHeaderMagic;
  uint32_t version = kHeaderVersion;
  uint64_t seq = 0;        // this rank's submission number (for messages; ranks may differ)
  // What collectives are matched by: a hash of the full name (names longer than `name`
  // still match exactly), or, for an unnamed call, of its place among this rank's unnamed
  // calls (`unnamed` = that place + 1; 0 for a named call).
  uint64_t name_hash = 0;
  uint64_t unnamed = 0;
  int32_t kind = 0;
  int32_t algorithm = 0;
  int32_t op = 0;
  int32_t dtype = 0;
  uint64_t count = 0;
  int32_t root = 0;
  uint32_t payload_bytes = 0;
  float sparsity = 0.f;  // 3LC sparsity multiplier; 0 when uncompressed
  uint32_t threelc_block = 0;  // 3LC block size B (0: one scale per tensor / partition)
  // A caller's own description of the call (AllreduceArgs::signature, e.g. a hash of a
  // shape the element count does not capture); part of the agreement. 0: none.
  uint64_t signature = 0;
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
  // payload(i) describe rank i (payload(rank) is our own). Returns false, on every rank
  // alike, when the ranks proposed collectives of different names (nothing is wrong yet:
  // the engine negotiates). Throws CollectiveTimeoutError naming the ranks that did not
  // join by the deadline, and CollectiveMismatchError (on every rank alike) when the
  // headers name the same collective but disagree on anything but the payload.
  bool exchange(const CollectiveHeader& mine, const void* payload, const Progress& progress);

  const CollectiveHeader& header(int rank) const { return headers_[rank]; }
  const char* payload(int rank) const { return payloads_[rank]; }

  // True when the last mismatch left the ranks unable to match later collectives (a
  // malformed header: another build of pybrain-mpi).
  bool order_broken() const { return order_broken_; }

 private:
  bool check_agreement(const Progress& progress);

  Transport& transport_;
  std::vector<CollectiveHeader> headers_;
  std::vector<const char*> payloads_;
  bool order_broken_ = false;
};

std::string describe_header(const CollectiveHeader& header);
// The identity collectives are matched by (CollectiveHeader::name_hash): FNV-1a of a name,
// or of an unnamed call's place among a rank's unnamed calls.
uint64_t name_hash(const std::string& name);
uint64_t unnamed_hash(uint64_t place);
// Whether two headers of the same name describe the same collective (kind, dtype, count,
// op, algorithm, compression, root, signature); `what` gets the first difference when not.
bool same_collective(const CollectiveHeader& a, const CollectiveHeader& b, std::string* what = nullptr);

}  // namespace pbm
