#include "threelc_state.h"

#include <algorithm>

#include "../common/errors.h"

namespace pbm {

namespace {
std::string label(const std::string& name) { return name.empty() ? "tensor" : "tensor '" + name + "'"; }
}  // namespace

const char* residual_kind_name(ResidualKind kind) {
  switch (kind) {
    case ResidualKind::kResidual: return "residual";
    case ResidualKind::kOwner: return "owner_residual";
    case ResidualKind::kHierarchical: return "hierarchical_residual";
    case ResidualKind::kHierarchicalOwner: return "hierarchical_owner_residual";
  }
  return "unknown";
}

ThreeLCState::ThreeLCState(size_t count) : count_(count) {
  buffers_[static_cast<int>(ResidualKind::kResidual)] = std::make_shared<FloatBuffer>(count, 0.f);
}

std::shared_ptr<FloatBuffer> ThreeLCState::slot(ResidualKind kind, size_t count, const ThreeLCLayout& layout,
                                                const std::string& name) {
  const int k = static_cast<int>(kind);
  std::shared_ptr<FloatBuffer>& buffer = buffers_[k];
  if (!buffer) {
    buffer = std::make_shared<FloatBuffer>(count, 0.f);
    made_for_ranks_[k] = layout.ranks;
    made_for_rank_[k] = layout.rank;
    return buffer;
  }
  const bool other_world = made_for_ranks_[k] != 0 &&
                           (made_for_ranks_[k] != layout.ranks || made_for_rank_[k] != layout.rank);
  if (buffer->size() != count || other_world) {
    const std::string made = made_for_ranks_[k] == 0
        ? "a checkpoint of another layout (" + std::to_string(buffer->size()) + " elements)"
        : "rank " + std::to_string(made_for_rank_[k]) + " of " + std::to_string(made_for_ranks_[k]);
    throw PbmError(label(name) + ": this ThreeLC state's " + residual_kind_name(kind) + " belongs to " + made +
                   ", not rank " + std::to_string(layout.rank) + " of " + std::to_string(layout.ranks) +
                   " with this topology (" + std::to_string(count) +
                   " elements); make a new state after changing the world");
  }
  made_for_ranks_[k] = layout.ranks;
  made_for_rank_[k] = layout.rank;
  return buffer;
}

ThreeLCResiduals ThreeLCState::bind(const ThreeLCLayout& layout, const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  ThreeLCResiduals residuals;
  if (layout.path == ThreeLCPath::kFlat) {
    if (layout.first != count_) throw PbmError(label(name) + ": a flat 3LC layout covers the whole tensor");
    residuals.first = buffers_[static_cast<int>(ResidualKind::kResidual)];
    residuals.second = slot(ResidualKind::kOwner, layout.second, layout, name);
  } else {
    residuals.first = slot(ResidualKind::kHierarchical, layout.first, layout, name);
    residuals.second = slot(ResidualKind::kHierarchicalOwner, layout.second, layout, name);
  }
  return residuals;
}

std::shared_ptr<FloatBuffer> ThreeLCState::buffer(ResidualKind kind) const {
  std::lock_guard<std::mutex> lock(mu_);
  return buffers_[static_cast<int>(kind)];
}

void ThreeLCState::load(ResidualKind kind, const float* data, size_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  const int k = static_cast<int>(kind);
  if (kind == ResidualKind::kResidual && count != count_) {
    throw PbmError("a saved 3LC residual of " + std::to_string(count) + " elements cannot restore the state of a " +
                   std::to_string(count_) + "-element tensor (saved with another model?)");
  }
  std::shared_ptr<FloatBuffer>& buffer = buffers_[k];
  // Same length: written in place, so views of it stay the state's buffer.
  if (!buffer || buffer->size() != count) buffer = std::make_shared<FloatBuffer>(count);
  std::copy(data, data + count, buffer->begin());
  if (kind != ResidualKind::kResidual) made_for_ranks_[k] = 0;  // checked by length at the next bind
}

void ThreeLCState::reset() {
  std::lock_guard<std::mutex> lock(mu_);
  FloatBuffer& residual = *buffers_[static_cast<int>(ResidualKind::kResidual)];
  std::fill(residual.begin(), residual.end(), 0.f);
  for (int k = 1; k < kResidualKinds; ++k) {
    buffers_[k].reset();
    made_for_ranks_[k] = 0;
  }
}

}  // namespace pbm
