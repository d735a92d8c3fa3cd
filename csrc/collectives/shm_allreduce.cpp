#include "shm_allreduce.h"

#include "../kernels/reduce.h"

namespace pbm {

AllreduceResult ShmAllreduce::run(const AllreduceArgs& args, const Progress& progress) {
  AllreduceResult result;
  if (args.count == 0) {
    result.finite_known = args.check_finite;  // nothing to check: finite
    return result;
  }
  NodeRounds rounds(node_, args, node_.round_elements(args.count, args.dtype));
  NodeSync& sync = node_.sync();
  // Finiteness rides along in the pass that stores the final result: the zero-copy push.
  const bool fused_finite = args.check_finite && rounds.zero_copy() &&
                            (args.dtype == DType::kFloat32 || args.dtype == DType::kFloat64);
  bool finite = true;
  uint64_t moved = 0;

  // Join: zero-copy reads peers' buffers in place, so each rank must know the others have
  // entered the collective (their buffers hold their inputs) before reading them.
  if (rounds.zero_copy()) sync.wait("join", progress);
  for (size_t k = 0; k < rounds.rounds(); ++k) {
    rounds.start(k);
    // Copy-in (copy path): the slices our peers reduce go to our arena segment; our own
    // slices are read from our buffer. Owners start once every rank has copied in.
    if (!rounds.zero_copy()) {
      moved += rounds.copy_in();
      sync.wait("copy-in", progress);
    }
    // Reduce our slices from every node rank, in local-rank order, in one pass.
    // Zero-copy ("push"): the result is stored into slice s of every node rank's buffer from
    // the same L1 block, so there is no copy-out pass (each rank reads N and writes N bytes
    // instead of 1.5N + 1.5N with two ranks). Hazards: slice s of any buffer is read and
    // written only by its owner (this rank) between the join sync and the final sync, so no
    // round needs a sync of its own; peers look at our results only after the final sync.
    // Copy path: we write our slice of our own buffer in place (only we read it during the
    // reduce) and publish it to our arena segment.
    moved += reduce_owned_slices(rounds, args, fused_finite ? &finite : nullptr);
    if (rounds.zero_copy()) continue;
    // Copy-out (copy path): once every owner has published its round, every other slice is
    // copied from its owner's arena segment.
    sync.wait("reduce", progress);
    moved += rounds.copy_out();
  }
  // Final sync: nobody reads our arena or buffer after it, so the caller may reuse both;
  // zero-copy, every owner has stored its slices into our buffer. A non-finite slice is
  // flagged with it, so every node rank reads the same answer after it.
  if (fused_finite && !finite) sync.flag_nonfinite();
  sync.wait(rounds.zero_copy() ? "push" : "copy-out", progress);
  if (fused_finite) {
    result.finite_known = true;
    result.finite = finite && !sync.nonfinite();
  }
  node_.count_shm_bytes(moved);
  return result;
}

uint64_t ShmAllreduce::reduce_owned_slices(NodeRounds& rounds, const AllreduceArgs& args, bool* finite) {
  const size_t esize = dtype_size(args.dtype);
  uint64_t moved = 0;
  for (int s = rounds.first_owned(); s < rounds.slice_count(); s += rounds.step_owned()) {
    const size_t n = rounds.slices().length(s);
    if (n == 0) continue;
    const std::vector<const void*>& inputs = rounds.inputs(s);
    const std::vector<void*>& outputs = rounds.outputs(s);
    ReduceInputs reduce{inputs.data(), static_cast<int>(inputs.size()), args.op, args.divisor,
                        outputs.data(), static_cast<int>(outputs.size())};
    reduce_n(rounds.mine(s), n, args.dtype, reduce, finite);
    moved += n * esize * outputs.size();
  }
  return moved;
}

}  // namespace pbm
