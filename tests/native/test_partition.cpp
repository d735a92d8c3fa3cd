// The one partition helper (csrc/common/partition.h): ring segments and 3LC partitions
// (even), node slices (aligned).
#include "check.h"
#include "common/partition.h"

using pbm::Partition;

CHECK_CASE(partition, even_pieces_cover_the_count_and_differ_by_at_most_one) {
  for (size_t count = 0; count <= 70; ++count) {
    for (int parts = 1; parts <= 9; ++parts) {
      const Partition p = Partition::even(count, parts);
      CHECK(p.begin(0) == 0 && p.begin(parts) == count);
      size_t total = 0;
      for (int i = 0; i < parts; ++i) {
        // the formula every user of it used to repeat: (count / n) * i + min(i, count % n)
        const size_t expected = (count / parts) * i + std::min<size_t>(i, count % parts);
        CHECK_THAT(p.begin(i) == expected, "count " << count << " parts " << parts << " piece " << i);
        CHECK(p.length(i) == count / parts + (static_cast<size_t>(i) < count % parts ? 1 : 0));
        total += p.length(i);
      }
      CHECK(total == count);
    }
  }
}

CHECK_CASE(partition, aligned_pieces_start_on_units_and_only_the_last_are_shorter) {
  for (size_t align : {1, 4, 8, 16}) {
    for (size_t count = 0; count <= 300; count += 7) {
      for (int parts = 1; parts <= 5; ++parts) {
        const Partition p = Partition::aligned(count, parts, align);
        // per = ceil(count / parts) rounded up to whole units, at least one unit
        const size_t ceil = (count + parts - 1) / parts;
        const size_t per = std::max(align, (ceil + align - 1) / align * align);
        CHECK(p.begin(0) == 0 && p.begin(parts) == count);
        for (int i = 0; i < parts; ++i) {
          CHECK_THAT(p.begin(i) == std::min(i * per, count), "align " << align << " count " << count << " piece " << i);
          CHECK(p.begin(i) % align == 0 || p.begin(i) == count);
        }
      }
    }
  }
  // the node stage's slices: 1000 float32 on 3 ranks -> 336 (21 cache lines), 336, 328
  const Partition slices = Partition::aligned(1000, 3, 16);
  CHECK(slices.length(0) == 336 && slices.length(1) == 336 && slices.length(2) == 328);
}

CHECK_CASE(partition, fewer_elements_than_parts_leave_trailing_pieces_empty) {
  const Partition even = Partition::even(2, 5);
  CHECK(even.length(0) == 1 && even.length(1) == 1 && even.length(2) == 0 && even.length(4) == 0);
  const Partition aligned = Partition::aligned(5, 4, 16);
  CHECK(aligned.length(0) == 5 && aligned.length(1) == 0 && aligned.begin(3) == 5);
}

CHECK_CASE(partition, counts_beyond_32_bits) {
  const size_t count = (size_t{3} << 32) + 7;
  const Partition even = Partition::even(count, 7);
  size_t total = 0;
  for (int i = 0; i < 7; ++i) total += even.length(i);
  CHECK(total == count && even.begin(7) == count);
  const Partition aligned = Partition::aligned(count, 3, 16);
  CHECK(aligned.begin(3) == count && aligned.length(0) % 16 == 0);
}
