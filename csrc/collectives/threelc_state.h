// The error-feedback state of one tensor under 3LC, and what each compressed allreduce path
// needs of it.
//
// Every path keeps two residuals (docs/background.md section 4): the first stage's, of what
// this rank sent, and the second stage's, of what it re-encoded as the owner of a partition:
//
//   path          first stage                              second stage
//   flat          the whole tensor ("residual"; also the   this rank's even partition of the
//   (ring, mpi)   residual of ThreeLC.encode)              tensor ("owner_residual")
//   hierarchical  the node slices this rank owns, back to  in each owned slice, this rank's
//                 back ("hierarchical_residual")           partition among the slice's ring
//                                                          of nodes ("hierarchical_owner_residual")
//   shm           one node: nothing crosses a network, the allreduce is exact, no state is used
//
// The algorithm of a path computes its layout (ThreeLCLayout: how many elements each stage
// holds on this rank) from the topology; this class is the one owner of the buffers: it
// makes them on first use (zeros) and refuses a later call whose layout differs (another
// world). Buffers are shared_ptr-held, so an allreduce in flight and any numpy view handed
// to Python keep theirs alive even across reset() or a load.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pbm {

using FloatBuffer = std::vector<float>;

// The four residual buffers of a state; the names are those Python uses.
enum class ResidualKind : int { kResidual = 0, kOwner = 1, kHierarchical = 2, kHierarchicalOwner = 3 };
constexpr int kResidualKinds = 4;
const char* residual_kind_name(ResidualKind kind);

enum class ThreeLCPath { kFlat, kHierarchical };

struct ThreeLCLayout {
  ThreeLCPath path = ThreeLCPath::kFlat;
  size_t first = 0;   // first-stage residual elements on this rank
  size_t second = 0;  // second-stage residual elements on this rank
  int ranks = 1;      // the world the layout was computed for (for messages)
  int rank = 0;
};

// The buffers one allreduce reads and updates (held until it has finished).
struct ThreeLCResiduals {
  std::shared_ptr<FloatBuffer> first;
  std::shared_ptr<FloatBuffer> second;
  float* first_data() const { return first ? first->data() : nullptr; }
  float* second_data() const { return second ? second->data() : nullptr; }
};

class ThreeLCState {
 public:
  explicit ThreeLCState(size_t count);

  size_t count() const { return count_; }

  // The residuals of `layout`'s path, made (zeroed) on first use. Throws PbmError naming
  // `name` when they exist with another layout (the world changed under the state).
  ThreeLCResiduals bind(const ThreeLCLayout& layout, const std::string& name);

  // A buffer, or null while its path has not run (nor been loaded). kResidual always exists.
  std::shared_ptr<FloatBuffer> buffer(ResidualKind kind) const;
  // Restores a buffer saved from a state of the same tensor and world (a checkpoint); the
  // next bind() checks its length against the path's layout.
  void load(ResidualKind kind, const float* data, size_t count);
  // Zeroes the first-stage residual and drops every other buffer (they are remade at the
  // next allreduce).
  void reset();

 private:
  std::shared_ptr<FloatBuffer> slot(ResidualKind kind, size_t count, const ThreeLCLayout& layout,
                                    const std::string& name);

  const size_t count_;
  mutable std::mutex mu_;
  std::shared_ptr<FloatBuffer> buffers_[kResidualKinds];
  // The world (ranks, rank) a path's buffers were made for; ranks 0: unknown (loaded).
  int made_for_ranks_[kResidualKinds] = {};
  int made_for_rank_[kResidualKinds] = {};
};

}  // namespace pbm
