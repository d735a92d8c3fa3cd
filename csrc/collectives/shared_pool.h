// Node shared memory ("windows"), and the pool of them behind pbm.shared_empty (zero-copy buffers).
//
// Ranks of one node map each other's memory, so the node stage's reduce and copies are plain
// loads and stores. Each rank's segment is a POSIX shared-memory object it creates and maps
// itself; the node's ranks exchange the names over the node communicator and map each other's
// (allocate_shared_window is collective, like MPI_Win_allocate_shared, which it replaces).
// Unlike an MPI window, a mapping is released locally: no collective is needed (a peer lost
// after a failure would never join one) and no MPI object is left for MPI_Finalize (MPICH's
// OFI netmod refuses to close its fabric while a shared window is alive). The names are
// unlinked as soon as every rank has mapped them, so nothing is left in /dev/shm.
//
// The pool hands out pieces of this rank's segment of a window with a bump allocator over
// windows that double in size: every node rank makes the same calls with the same sizes in
// the same order, so equal buffers land at equal offsets on every rank, and an allreduce of
// them can agree (through the join headers) to read and write the node's buffers in place.
// Pool windows stay mapped while pybrain-mpi runs (user tensors may point into them); their
// pages are handed back at shutdown (release_own_pages).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "transport.h"

namespace pbm {

// One shared-memory window: this rank's segment and every node peer's, mapped here.
struct SharedWindow {
  std::vector<char*> base;    // by local rank (empty: no window)
  std::vector<size_t> bytes;  // segment size by local rank
};

// Collective over `comm` (the ranks of one node): a window with `bytes` (rounded up to
// pages) per rank, each rank's segment created and first touched by that rank (its own NUMA
// node where that applies). Throws on every rank, naming the cause, if any rank fails.
SharedWindow allocate_shared_window(const Transport& world, MPI_Comm comm, size_t bytes);
// Unmaps the window here (local: peers keep their mappings until they free theirs).
void free_shared_window(const Transport& world, SharedWindow& window);
// Hands this rank's pages of `window` back to the system; a later touch reads zeros. Local.
void release_own_pages(const SharedWindow& window, int local_rank);

// Where every node rank's buffer lies in the pool, when all lie at the same place: the
// node stage then reads and writes peers' buffers directly instead of copying them.
struct ZeroCopyPlacement {
  int32_t window = -1;
  uint64_t offset = 0;
  bool valid() const { return window >= 0; }
};

class SharedPool {
 public:
  // `comm`: the node's communicator for pool windows, used only by alloc() (on the thread
  // of the caller of pbm.shared_empty, not the progress thread).
  SharedPool(const Transport& world, MPI_Comm comm, int local_rank);

  // `bytes` inside this rank's segment of a pool window. Collective over the node (see
  // above). Thread-safe against running collectives.
  void* alloc(size_t bytes);
  // Makes all pool memory reusable by later alloc() calls (earlier buffers alias it).
  void reset();
  // Where [data, data + bytes) lies, if in a pool window.
  bool locate(const void* data, size_t bytes, ZeroCopyPlacement* where) const;
  // Whether `where` names `bytes` valid on every node rank's segment.
  bool valid(const ZeroCopyPlacement& where, size_t bytes) const;
  // Every node rank's address of `where`, by local rank.
  void addresses(const ZeroCopyPlacement& where, std::vector<char*>* out) const;
  // Hands this rank's pages of every pool window back (pybrain_mpi.shutdown()).
  void release_pages() const;

 private:
  const Transport& world_;
  MPI_Comm comm_;
  int local_rank_;
  mutable std::mutex mu_;
  std::vector<SharedWindow> windows_;
  std::vector<size_t> used_;
};

}  // namespace pbm
