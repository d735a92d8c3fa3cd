#include "shared_pool.h"

#include <algorithm>

#include <sys/mman.h>
#include <unistd.h>

#include "../common/partition.h"

namespace pbm {

namespace {
constexpr size_t kPoolAlign = 256;  // pool allocations start on 256-byte boundaries
constexpr size_t kMinPoolBytes = 1 << 20;
}  // namespace

SharedWindow allocate_shared_window(const Transport& world, MPI_Comm comm, size_t bytes) {
  SharedWindow window;
  MPI_Info info;
  MPI_Info_create(&info);
  // Each rank's segment on its own pages (and its own NUMA node where that applies).
  MPI_Info_set(info, "alloc_shared_noncontig", "true");
  char* base = nullptr;
  const int rc = MPI_Win_allocate_shared(static_cast<MPI_Aint>(std::max<size_t>(bytes, 64)), 1, info,
                                         comm, &base, &window.win);
  MPI_Info_free(&info);
  world.check(rc, "MPI_Win_allocate_shared (node stage)");
  MPI_Win_set_errhandler(window.win, MPI_ERRORS_RETURN);
  int n = 0;
  MPI_Comm_size(comm, &n);
  window.base.resize(n);
  window.bytes.resize(n);
  for (int q = 0; q < n; ++q) {
    MPI_Aint size = 0;
    int disp = 0;
    char* pointer = nullptr;
    world.check(MPI_Win_shared_query(window.win, q, &size, &disp, &pointer), "MPI_Win_shared_query");
    window.base[q] = pointer;
    window.bytes[q] = static_cast<size_t>(size);
  }
  return window;
}

void free_shared_window(const Transport& world, SharedWindow& window) {
  if (window.win != MPI_WIN_NULL) world.check(MPI_Win_free(&window.win), "MPI_Win_free (node stage)");
  window = SharedWindow{};
}

void release_own_pages(const SharedWindow& window, int local_rank) {
  if (window.win == MPI_WIN_NULL || window.base.size() <= static_cast<size_t>(local_rank)) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t begin = reinterpret_cast<uintptr_t>(window.base[local_rank]);
  uintptr_t end = begin + window.bytes[local_rank];
  begin = (begin + page - 1) / page * page;
  end = end / page * page;
  // MADV_REMOVE frees the shared (tmpfs) backing of our own segment; a later touch would
  // read zeros. Failure (e.g. a backing that does not support it) only means no release.
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_REMOVE);
}

SharedPool::SharedPool(const Transport& world, MPI_Comm comm, int local_rank)
    : world_(world), comm_(comm), local_rank_(local_rank) {}

void* SharedPool::alloc(size_t bytes) {
  bytes = round_up(std::max<size_t>(bytes, 1), kPoolAlign);
  size_t window_bytes = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!windows_.empty()) {
      const size_t last = windows_.size() - 1;
      if (used_[last] + bytes <= windows_[last].bytes[local_rank_]) {
        char* pointer = windows_[last].base[local_rank_] + used_[last];
        used_[last] += bytes;
        return pointer;
      }
      window_bytes = windows_[last].bytes[local_rank_];
    }
  }
  // A new window, collective over the node; allocated outside the lock so a collective on
  // the progress thread can still look up buffers meanwhile.
  window_bytes = std::max({bytes, 2 * window_bytes, kMinPoolBytes});
  SharedWindow window = allocate_shared_window(world_, comm_, window_bytes);
  std::lock_guard<std::mutex> lock(mu_);
  char* pointer = window.base[local_rank_];
  windows_.push_back(std::move(window));
  used_.push_back(bytes);
  return pointer;
}

void SharedPool::reset() {
  std::lock_guard<std::mutex> lock(mu_);
  std::fill(used_.begin(), used_.end(), 0);
}

bool SharedPool::locate(const void* data, size_t bytes, ZeroCopyPlacement* where) const {
  const char* p = static_cast<const char*>(data);
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t w = 0; w < windows_.size(); ++w) {
    const char* base = windows_[w].base[local_rank_];
    if (p >= base && p + bytes <= base + windows_[w].bytes[local_rank_]) {
      where->window = static_cast<int32_t>(w);
      where->offset = static_cast<uint64_t>(p - base);
      return true;
    }
  }
  return false;
}

bool SharedPool::valid(const ZeroCopyPlacement& where, size_t bytes) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (where.window < 0 || static_cast<size_t>(where.window) >= windows_.size()) return false;
  for (size_t segment : windows_[where.window].bytes)
    if (where.offset + bytes > segment) return false;
  return true;
}

void SharedPool::addresses(const ZeroCopyPlacement& where, std::vector<char*>* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  const SharedWindow& window = windows_[where.window];
  out->resize(window.base.size());
  for (size_t q = 0; q < window.base.size(); ++q) (*out)[q] = window.base[q] + where.offset;
}

void SharedPool::release_pages() const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& window : windows_) release_own_pages(window, local_rank_);
}

}  // namespace pbm
