// How `count` elements are cut into `parts` contiguous pieces: the one piece of arithmetic
// behind ring segments, 3LC partitions and the shared-memory node stage's slices.
//
//   even(count, parts)            piece sizes differ by at most one element (the first
//                                 count % parts pieces are one longer). Any count works,
//                                 fewer elements than parts included (the last pieces are
//                                 then empty). Ring segments and 3LC partitions: balanced
//                                 work and traffic per rank.
//   aligned(count, parts, align)  every piece `per` elements, a multiple of `align` (at
//                                 least one unit), the last ones shorter or empty. Node
//                                 slices: each rank's slice starts on its own cache line,
//                                 so no two ranks write the same line.
//
// Both are begin(i) = min(i * per + min(i, extra), count), with extra = 0 when aligned.
#pragma once

#include <algorithm>
#include <cstddef>

namespace pbm {

inline size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

class Partition {
 public:
  static Partition even(size_t count, int parts) {
    const size_t p = static_cast<size_t>(std::max(parts, 1));
    return Partition(count, parts, count / p, count % p);
  }

  static Partition aligned(size_t count, int parts, size_t align) {
    const size_t p = static_cast<size_t>(std::max(parts, 1));
    return Partition(count, parts, std::max(align, round_up((count + p - 1) / p, align)), 0);
  }

  size_t count() const { return count_; }
  int parts() const { return parts_; }
  size_t begin(int piece) const {
    const size_t i = static_cast<size_t>(piece);
    return std::min(i * per_ + std::min(i, extra_), count_);
  }
  size_t length(int piece) const { return begin(piece + 1) - begin(piece); }

 private:
  Partition(size_t count, int parts, size_t per, size_t extra)
      : count_(count), parts_(parts), per_(per), extra_(extra) {}

  size_t count_;
  int parts_;
  size_t per_;    // elements of a piece (even: of the shorter ones)
  size_t extra_;  // even: pieces that hold one element more
};

}  // namespace pbm
