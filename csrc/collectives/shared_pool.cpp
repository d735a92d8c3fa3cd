#include "shared_pool.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>

#include <fcntl.h>

#include <sys/mman.h>
#include <unistd.h>

#include "../common/partition.h"

namespace pbm {

namespace {
constexpr size_t kPoolAlign = 256;  // pool allocations start on 256-byte boundaries
constexpr size_t kMinPoolBytes = 1 << 20;
}  // namespace

namespace {
// Names are unique per process and call; the node's ranks open each other's by name.
std::string segment_name(int pid, uint64_t serial) {
  return "/pbm-" + std::to_string(pid) + "-" + std::to_string(serial);
}

std::atomic<uint64_t> segments_made{0};

// This rank's segment: a POSIX shared-memory object of `bytes`, reserved up front (so a full
// /dev/shm is an error here, not a SIGBUS on first touch) and mapped. Returns an error text, or
// "" on success.
std::string create_segment(const std::string& name, size_t bytes, char** base) {
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return "shm_open(" + name + "): " + std::strerror(errno);
  std::string error;
  const int reserved = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (reserved != 0) {
    error = "reserving " + std::to_string(bytes) + " bytes in " + name + " (/dev/shm): " + std::strerror(reserved);
  } else {
    void* mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mapped == MAP_FAILED) error = "mmap(" + name + "): " + std::strerror(errno);
    else *base = static_cast<char*>(mapped);
  }
  close(fd);
  if (!error.empty()) shm_unlink(name.c_str());
  return error;
}
}  // namespace

SharedWindow allocate_shared_window(const Transport& world, MPI_Comm comm, size_t bytes) {
  // Each rank's segment is its own shared-memory object, created (and its pages first
  // touched) by the rank itself, so it lies on that rank's NUMA node. Not an MPI window: an
  // MPI window must be freed collectively (a peer lost after a failure never would) and some
  // netmods (OFI) refuse to finalize while one is alive; a mapping is released locally.
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t mine_bytes = round_up(std::max<size_t>(bytes, 64), page);
  const uint64_t serial = segments_made.fetch_add(1);
  const std::string name = segment_name(static_cast<int>(getpid()), serial);
  char* own = nullptr;
  const std::string error = create_segment(name, mine_bytes, &own);

  // Every rank learns every peer's segment (pid, serial, size) and whether it was made.
  int n = 0, me = 0;
  MPI_Comm_size(comm, &n);
  MPI_Comm_rank(comm, &me);
  const uint64_t record[4] = {static_cast<uint64_t>(getpid()), serial, mine_bytes, error.empty() ? 1u : 0u};
  std::vector<uint64_t> records(4 * static_cast<size_t>(n));
  world.check(MPI_Allgather(record, 4, MPI_UINT64_T, records.data(), 4, MPI_UINT64_T, comm),
              "MPI_Allgather (shared segments)");
  std::string failed;
  for (int q = 0; q < n; ++q)
    if (records[4 * q + 3] == 0) failed += (failed.empty() ? "" : ", ") + std::to_string(q);

  SharedWindow window;
  window.base.assign(n, nullptr);
  window.bytes.assign(n, 0);
  std::string map_error;
  if (failed.empty()) {
    for (int q = 0; q < n; ++q) {
      window.bytes[q] = records[4 * q + 2];
      if (q == me) {
        window.base[q] = own;
        continue;
      }
      const std::string peer = segment_name(static_cast<int>(records[4 * q]), records[4 * q + 1]);
      const int fd = shm_open(peer.c_str(), O_RDWR, 0600);
      void* mapped = fd < 0 ? MAP_FAILED : mmap(nullptr, window.bytes[q], PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (fd >= 0) close(fd);
      if (mapped == MAP_FAILED) {
        if (map_error.empty()) map_error = "mapping node rank " + std::to_string(q) + "'s " + peer + ": " + std::strerror(errno);
        continue;
      }
      window.base[q] = static_cast<char*>(mapped);
    }
  }
  // Once every rank has mapped every segment the names can go: the memory lives as long as
  // a mapping does, and nothing is left in /dev/shm if a rank dies later.
  int mapped_all = map_error.empty() ? 1 : 0, everyone = 0;
  world.check(MPI_Allreduce(&mapped_all, &everyone, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce (shared segments)");
  if (error.empty()) shm_unlink(name.c_str());
  if (!failed.empty() || !everyone) {
    const bool own_in_window = failed.empty();  // else only `own` was mapped
    free_shared_window(world, window);
    if (own != nullptr && !own_in_window) munmap(own, mine_bytes);
    std::string why = !error.empty()     ? error
                      : !map_error.empty() ? map_error
                      : !failed.empty()    ? "node rank(s) " + failed + " could not create their shared memory"
                                           : "a node peer could not map this node's shared memory";
    throw PbmError("rank " + std::to_string(world.world_rank(world.rank())) + ": shared memory of " +
                   std::to_string(mine_bytes) + " bytes per rank for the node stage: " + why);
  }
  return window;
}

void free_shared_window(const Transport&, SharedWindow& window) {
  // Local: each rank drops its own mappings; the memory goes when the last one does.
  for (size_t q = 0; q < window.base.size(); ++q)
    if (window.base[q] != nullptr) munmap(window.base[q], window.bytes[q]);
  window = SharedWindow{};
}

void release_own_pages(const SharedWindow& window, int local_rank) {
  if (window.base.size() <= static_cast<size_t>(local_rank) || window.base[local_rank] == nullptr) return;
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
