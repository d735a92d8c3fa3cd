#include "shm_allreduce.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <sstream>

#include <sys/mman.h>
#include <unistd.h>

#include "../kernels/reduce.h"

namespace pbm {

namespace {
constexpr size_t kFlagBytes = 64;        // one cache line per rank: no false sharing
constexpr size_t kPoolAlign = 256;       // pool allocations start on 256-byte boundaries
constexpr size_t kMinPoolBytes = 1 << 20;

size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Slices of one round of m elements: P slices of equal 64-byte-aligned length (the last
// ones shorter or empty), so every rank's slice starts on its own cache line.
struct Slices {
  size_t m = 0;
  size_t per = 0;
  size_t begin(int s) const { return std::min(static_cast<size_t>(s) * per, m); }
  size_t length(int s) const { return begin(s + 1) - begin(s); }
};

Slices slices_of(size_t m, int parts, size_t align) {
  Slices slices;
  slices.m = m;
  slices.per = std::max(align, round_up((m + parts - 1) / parts, align));
  return slices;
}
}  // namespace

NodeStage::NodeStage(Transport& world, int node_color) : world_(world) {
  MPI_Comm comm = world.comm();
  const int world_rank = world.rank();
  const int world_size = world.size();
  world.check(MPI_Comm_split(comm, node_color, world_rank, &node_comm_), "MPI_Comm_split (node)");
  MPI_Comm_set_errhandler(node_comm_, MPI_ERRORS_RETURN);
  world.check(MPI_Comm_dup(node_comm_, &pool_comm_), "MPI_Comm_dup (node pool)");
  MPI_Comm_rank(node_comm_, &local_rank_);
  MPI_Comm_size(node_comm_, &local_size_);
  world_of_local_.assign(local_size_, 0);
  world.check(MPI_Allgather(&world_rank, 1, MPI_INT, world_of_local_.data(), 1, MPI_INT, node_comm_),
              "MPI_Allgather (node ranks)");

  // Every rank learns every rank's node and local size: the slice count P and the rings
  // must be the same everywhere.
  const int mine[3] = {node_color, local_rank_, local_size_};
  std::vector<int> all(3 * static_cast<size_t>(world_size));
  world.check(MPI_Allgather(mine, 3, MPI_INT, all.data(), 3, MPI_INT, comm), "MPI_Allgather (topology)");
  std::vector<int> colors;
  slices_ = 1;
  for (int r = 0; r < world_size; ++r) {
    colors.push_back(all[3 * r]);
    slices_ = std::max(slices_, all[3 * r + 2]);
  }
  std::sort(colors.begin(), colors.end());
  node_count_ = static_cast<int>(std::unique(colors.begin(), colors.end()) - colors.begin());

  // Slice rings: for slice s, the rank owning s (local rank s % L) on every node. All
  // splits first (collective over the world), then the duplications inside each ring.
  if (node_count_ > 1) {
    std::vector<MPI_Comm> subs(slices_, MPI_COMM_NULL);
    for (int s = 0; s < slices_; ++s) {
      const bool owner = s % local_size_ == local_rank_;
      world.check(MPI_Comm_split(comm, owner ? 0 : MPI_UNDEFINED, world_rank, &subs[s]),
                  "MPI_Comm_split (slice ring)");
    }
    slice_transports_.resize(slices_);
    slice_rings_.resize(slices_);
    slice_compressed_.resize(slices_);
    for (int s = 0; s < slices_; ++s) {
      if (subs[s] == MPI_COMM_NULL) continue;
      auto transport = std::make_unique<Transport>(subs[s]);
      std::vector<int> world_of(transport->size());
      world.check(MPI_Allgather(&world_rank, 1, MPI_INT, world_of.data(), 1, MPI_INT, subs[s]),
                  "MPI_Allgather (slice ring)");
      transport->set_world_ranks(std::move(world_of));
      MPI_Comm_free(&subs[s]);
      slice_rings_[s] = std::make_unique<RingAllreduce>(*transport);
      slice_compressed_[s] = std::make_unique<CompressedAllreduce>(*transport);
      slice_transports_[s] = std::move(transport);
    }
  }

  control_ = allocate_window(node_comm_, kFlagBytes);
  flags_.resize(local_size_);
  failed_.resize(local_size_);
  nonfinite_.resize(local_size_);
  flags_[local_rank_] = new (control_.base[local_rank_]) std::atomic<uint64_t>(0);
  failed_[local_rank_] = new (control_.base[local_rank_] + 8) std::atomic<uint64_t>(0);
  nonfinite_[local_rank_] = new (control_.base[local_rank_] + 16) std::atomic<uint64_t>(0);
  for (int q = 0; q < local_size_; ++q) {
    flags_[q] = reinterpret_cast<std::atomic<uint64_t>*>(control_.base[q]);
    failed_[q] = reinterpret_cast<std::atomic<uint64_t>*>(control_.base[q] + 8);
    nonfinite_[q] = reinterpret_cast<std::atomic<uint64_t>*>(control_.base[q] + 16);
  }
  // Peers may read our flag only once it is constructed: the one barrier of the node stage,
  // at init, where every rank is anyway (like MPI_Comm_dup).
  world.check(MPI_Barrier(node_comm_), "MPI_Barrier (node stage set-up)");
}

NodeStage::~NodeStage() {
  // Shared windows are not freed: MPI_Win_free is a blocking collective and a peer that
  // left after a failure would never join it (no timeout can make that agreement safe).
  // Their pages are handed back instead, which is local: pybrain_mpi.shutdown() followed
  // by init() again does not keep the old buffers resident. Only while MPI is live: after
  // MPI_Finalize the addresses may belong to other mappings.
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  release_own_pages(arena_);
  for (const auto& pool : pools_) release_own_pages(pool);
  if (pool_comm_ != MPI_COMM_NULL) MPI_Comm_free(&pool_comm_);
}

uint64_t NodeStage::bytes_sent() const {
  uint64_t total = 0;
  for (const auto& transport : slice_transports_)
    if (transport) total += transport->bytes_sent.load();
  return total;
}

SharedWindow NodeStage::allocate_window(MPI_Comm comm, size_t bytes) {
  SharedWindow window;
  MPI_Info info;
  MPI_Info_create(&info);
  // Each rank's segment on its own pages (and its own NUMA node where that applies).
  MPI_Info_set(info, "alloc_shared_noncontig", "true");
  char* base = nullptr;
  const int rc = MPI_Win_allocate_shared(static_cast<MPI_Aint>(std::max<size_t>(bytes, 64)), 1, info,
                                         comm, &base, &window.win);
  MPI_Info_free(&info);
  world_.check(rc, "MPI_Win_allocate_shared (node stage)");
  MPI_Win_set_errhandler(window.win, MPI_ERRORS_RETURN);
  int n = 0;
  MPI_Comm_size(comm, &n);
  window.base.resize(n);
  window.bytes.resize(n);
  for (int q = 0; q < n; ++q) {
    MPI_Aint size = 0;
    int disp = 0;
    char* pointer = nullptr;
    world_.check(MPI_Win_shared_query(window.win, q, &size, &disp, &pointer), "MPI_Win_shared_query");
    window.base[q] = pointer;
    window.bytes[q] = static_cast<size_t>(size);
  }
  return window;
}

void NodeStage::release_own_pages(const SharedWindow& window) const {
  if (window.win == MPI_WIN_NULL || window.base.size() <= static_cast<size_t>(local_rank_)) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t begin = reinterpret_cast<uintptr_t>(window.base[local_rank_]);
  uintptr_t end = begin + window.bytes[local_rank_];
  begin = (begin + page - 1) / page * page;
  end = end / page * page;
  // MADV_REMOVE frees the shared (tmpfs) backing of our own segment; a later touch would
  // read zeros. Failure (e.g. a backing that does not support it) only means no release.
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_REMOVE);
}

void NodeStage::free_window(SharedWindow& window) {
  if (window.win != MPI_WIN_NULL) world_.check(MPI_Win_free(&window.win), "MPI_Win_free (node stage)");
  window = SharedWindow{};
}

void NodeStage::sync(const char* phase, Clock::time_point deadline, const Describe& what,
                     ProgressStatus* status) {
  // Every node rank runs the same collectives and the same number of syncs in each, so
  // sync number e is the same point on all of them. Release: our writes to shared memory
  // before the sync are visible to a peer that acquires our flag.
  const uint64_t epoch = ++epoch_;
  flags_[local_rank_]->store(epoch, std::memory_order_release);
  bool reported = false;
  for (uint64_t spin = 0;; ++spin) {
    bool all = true;
    for (int q = 0; q < local_size_ && all; ++q)
      all = flags_[q]->load(std::memory_order_acquire) >= epoch;
    if (all) return;
    if ((spin & 63) != 63) continue;
    Transport::back_off_for_this_thread(spin);
    const bool aborted = aborted_.load() || world_.aborted();
    const bool late = Clock::now() >= deadline;
    if (!reported || aborted || late) {
      std::vector<int> missing;
      for (int q = 0; q < local_size_; ++q)
        if (flags_[q]->load(std::memory_order_acquire) < epoch) missing.push_back(world_of_local_[q]);
      // Everyone arrived after all (this thread may have been descheduled, or the process
      // stopped, between the poll above and the clock read): that is not a timeout.
      if (missing.empty()) return;
      if (status && !reported) status->set(what() + ": shared-memory " + phase, missing);
      reported = true;
      if (aborted || late) {
        healthy_ = false;
        std::ostringstream message;
        message << "rank " << world_.rank() << ": " << what() << ": shared-memory " << phase
                << (aborted ? " was aborted (engine shutting down)" : " timed out")
                << "; waiting for node rank" << (missing.size() == 1 ? " " : "s ");
        for (size_t i = 0; i < missing.size(); ++i) message << (i ? ", " : "") << missing[i];
        throw CollectiveTimeoutError(message.str(), missing);
      }
    }
  }
}

void NodeStage::ensure_arena(size_t bytes, Clock::time_point, const Describe&, ProgressStatus*) {
  if (arena_bytes_ >= bytes) return;
  // Every node rank runs this collective with the same count (the join checked it), so all
  // grow here, to the same size, without agreeing on it. Every collective ends with a sync
  // after the last read of the arena, so no peer still reads the old one.
  const size_t grown = std::max(bytes, 2 * arena_bytes_);
  free_window(arena_);
  arena_ = allocate_window(node_comm_, grown);
  arena_bytes_ = grown;
}

void* NodeStage::shared_alloc(size_t bytes) {
  bytes = round_up(std::max<size_t>(bytes, 1), kPoolAlign);
  size_t window_bytes = 0;
  {
    std::lock_guard<std::mutex> lock(pool_mu_);
    if (!pools_.empty()) {
      const size_t last = pools_.size() - 1;
      if (pool_used_[last] + bytes <= pools_[last].bytes[local_rank_]) {
        char* pointer = pools_[last].base[local_rank_] + pool_used_[last];
        pool_used_[last] += bytes;
        return pointer;
      }
      window_bytes = pools_[last].bytes[local_rank_];
    }
  }
  // A new window, collective over the node; allocated outside the lock so a collective on
  // the progress thread can still look up buffers meanwhile.
  window_bytes = std::max({bytes, 2 * window_bytes, kMinPoolBytes});
  SharedWindow window = allocate_window(pool_comm_, window_bytes);
  std::lock_guard<std::mutex> lock(pool_mu_);
  char* pointer = window.base[local_rank_];
  pools_.push_back(std::move(window));
  pool_used_.push_back(bytes);
  return pointer;
}

void NodeStage::shared_reset() {
  std::lock_guard<std::mutex> lock(pool_mu_);
  std::fill(pool_used_.begin(), pool_used_.end(), 0);
}

bool NodeStage::locate(const void* data, size_t bytes, int32_t* window, uint64_t* offset) const {
  const char* p = static_cast<const char*>(data);
  std::lock_guard<std::mutex> lock(pool_mu_);
  for (size_t w = 0; w < pools_.size(); ++w) {
    const char* base = pools_[w].base[local_rank_];
    if (p >= base && p + bytes <= base + pools_[w].bytes[local_rank_]) {
      *window = static_cast<int32_t>(w);
      *offset = static_cast<uint64_t>(p - base);
      return true;
    }
  }
  return false;
}

bool NodeStage::pool_region_valid(int32_t window, uint64_t offset, size_t bytes) const {
  std::lock_guard<std::mutex> lock(pool_mu_);
  if (window < 0 || static_cast<size_t>(window) >= pools_.size()) return false;
  for (size_t segment : pools_[window].bytes)
    if (offset + bytes > segment) return false;
  return true;
}

size_t NodeStage::owned_elements(size_t count, DType dtype) const {
  // Compressed hierarchical allreduces run as one round over the whole buffer.
  const Slices slices = slices_of(count, slices_, std::max<size_t>(1, 64 / dtype_size(dtype)));
  size_t total = 0;
  for (int s = local_rank_; s < slices_; s += local_size_) total += slices.length(s);
  return total;
}

size_t NodeStage::owner_residual_elements(size_t count, DType dtype) const {
  const Slices slices = slices_of(count, slices_, std::max<size_t>(1, 64 / dtype_size(dtype)));
  size_t total = 0;
  for (int s = local_rank_; s < slices_; s += local_size_) {
    if (s >= static_cast<int>(slice_transports_.size()) || !slice_transports_[s]) continue;
    const Transport& ring = *slice_transports_[s];
    total += CompressedAllreduce::partition_count(slices.length(s), ring.size(), ring.rank());
  }
  return total;
}

bool NodeStage::inter_node(int slice, char* data, size_t elems, DType dtype, ReduceOp op,
                           double divisor, const InterNode& inter, size_t* residual_offset,
                           size_t* owner_offset, Clock::time_point deadline, const Describe& what,
                           ProgressStatus* status, const std::vector<void*>* also_out,
                           const float* const* node_inputs, int n_node_inputs) {
  if (slice >= static_cast<int>(slice_transports_.size()) || !slice_transports_[slice]) return false;
  Transport& ring = *slice_transports_[slice];
  const Describe slice_what = [&] { return what() + ": inter-node slice " + std::to_string(slice); };
  if (!inter.threelc) {
    slice_rings_[slice]->run(data, elems, dtype, op, divisor, deadline, slice_what, status);
    return false;
  }
  // 3LC on the inter-node stage only: the slice is already the exact node sum. The sum is
  // divided by the world size in the final decode (nodes may hold different numbers of
  // ranks), which also stores the result into the peers' copies of the slice.
  slice_compressed_[slice]->run(data, elems, dtype, false, inter.sparsity,
                                inter.residual + *residual_offset,
                                inter.owner_residual + *owner_offset, inter.name, deadline,
                                slice_what, status, divisor, also_out, node_inputs, n_node_inputs);
  *residual_offset += elems;
  *owner_offset += CompressedAllreduce::partition_count(elems, ring.size(), ring.rank());
  return true;
}

bool NodeStage::allreduce(void* data_void, size_t count, DType dtype, ReduceOp op, double divisor,
                          int32_t zero_copy_window, uint64_t zero_copy_offset,
                          const InterNode& inter, Clock::time_point deadline, const Describe& what,
                          ProgressStatus* status, bool* finite) {
  if (count == 0) {
    if (finite) *finite = true;
    return finite != nullptr;
  }
  char* data = static_cast<char*>(data_void);
  const size_t esize = dtype_size(dtype);
  const size_t align = std::max<size_t>(1, 64 / esize);
  const int L = local_size_;
  const int P = slices_;
  const int me = local_rank_;
  const bool zero_copy = zero_copy_window >= 0;
  const bool hierarchical = inter.enabled && node_count_ > 1;
  // Finiteness rides along in the reduce pass where that pass produces the final result.
  const bool fused_finite = finite != nullptr && zero_copy && !hierarchical &&
                            (dtype == DType::kFloat32 || dtype == DType::kFloat64);
  bool slices_finite = true;
  // The node stage divides only when it is the whole allreduce; otherwise the inter-node
  // stage divides the slice it finishes.
  const double node_divisor = hierarchical ? 1.0 : divisor;

  // Rounds: copy-in, reduce and copy-out of a round stay in cache. 3LC runs as one round
  // (its error-feedback state is laid out per owned slice of the whole buffer).
  size_t chunk = count;
  if (!(hierarchical && inter.threelc)) {
    const size_t unit = align * static_cast<size_t>(P);
    chunk = std::max(unit, chunk_bytes / esize / unit * unit);
    chunk = std::min(chunk, count);
  }
  const size_t rounds = (count + chunk - 1) / chunk;
  // Copy path: the arena holds one round (two alternating halves when there are several,
  // so round k+1's copy-in cannot overwrite what a slower peer still reads from round k).
  const size_t half_bytes = round_up(chunk * esize, 64);
  if (!zero_copy && L > 1) ensure_arena(rounds > 1 ? 2 * half_bytes : half_bytes, deadline, what, status);

  std::vector<char*> peer(L, nullptr);
  if (zero_copy) {
    std::lock_guard<std::mutex> lock(pool_mu_);
    for (int q = 0; q < L; ++q) peer[q] = pools_[zero_copy_window].base[q] + zero_copy_offset;
  }
  std::vector<const void*> inputs(L);
  size_t residual_offset = 0;
  size_t owner_offset = 0;
  uint64_t moved = 0;
  std::string failure;

  // Zero-copy: peers' buffers are read in place, so each rank must know the others have
  // entered the collective (their buffers hold their inputs) before reading them.
  if (zero_copy && L > 1) sync("join", deadline, what, status);
  // An agreed failure (3LC: NaN/Inf on some rank) reached every node through the owners of
  // the failing slice; all node ranks see it after the same sync and raise together.
  auto raise_agreed_failure = [&] {
    for (int q = 0; q < L; ++q) {
      if (failed_[q]->load(std::memory_order_relaxed) == epoch_ && epoch_ != 0 && failure.empty())
        failure = "rank " + std::to_string(world_.rank()) + ": " + what() +
                  ": 3LC found NaN/Inf in the inter-node stage of the slice owned by node rank " +
                  std::to_string(world_of_local_[q]) + " (a node's sum of the gradient)";
    }
    if (!failure.empty())
      throw AgreedFailureError(failure + " (the buffer holds intermediate values; skip this step)");
  };
  std::vector<void*> peer_outs;
  peer_outs.reserve(L);
  std::vector<const float*> node_inputs(L, nullptr);
  for (size_t k = 0; k < rounds; ++k) {
    const size_t lo = k * chunk;
    const Slices slices = slices_of(std::min(chunk, count - lo), P, align);
    char* mine = data + lo * esize;
    auto arena = [&](int q) { return arena_.base[q] + (rounds > 1 ? (k % 2) * half_bytes : 0); };
    // The source of slice s on local rank q for the reduce and for the copy-out.
    auto source = [&](int q, int s) -> char* {
      const size_t at = slices.begin(s) * esize;
      return zero_copy ? peer[q] + lo * esize + at : arena(q) + at;
    };

    if (!zero_copy) {
      // Copy-in: only the slices peers reduce; our own is read from the user buffer.
      for (int s = 0; s < P; ++s) {
        if (s % L == me || slices.length(s) == 0) continue;
        std::memcpy(arena(me) + slices.begin(s) * esize, mine + slices.begin(s) * esize,
                    slices.length(s) * esize);
        moved += slices.length(s) * esize;
      }
      if (L > 1) sync("copy-in", deadline, what, status);
    }

    // Reduce our slices from every node rank, in local-rank order, in one pass.
    // Zero-copy ("push"): the result is stored into slice s of every node rank's buffer from
    // the same L1 block, so there is no copy-out pass (each rank reads N and writes N bytes
    // instead of 1.5N + 1.5N with two ranks). Hazards: slice s of any buffer is read and
    // written only by its owner (this rank) between the join sync and the final sync, so no
    // round needs a sync of its own; peers look at our results only after the final sync.
    // Copy path: we write our slice s of our own buffer in place (only we read it during the
    // reduce) and publish it to the arena, which peers read after the "reduce" sync.
    for (int s = me; s < P; s += L) {
      const size_t n = slices.length(s);
      if (n == 0) continue;
      char* out = mine + slices.begin(s) * esize;
      for (int q = 0; q < L; ++q) inputs[q] = q == me ? out : source(q, s);
      peer_outs.clear();
      if (zero_copy) {
        for (int q = 0; q < L; ++q)
          if (q != me) peer_outs.push_back(source(q, s));
      } else if (L > 1) {
        peer_outs.push_back(arena(me) + slices.begin(s) * esize);
      }
      // Hierarchical: the copies go out only after the inter-node stage finished the slice.
      // 3LC between nodes (float32) sums the node inputs inside its own encode passes.
      const bool sum_in_3lc = hierarchical && inter.threelc && dtype == DType::kFloat32 &&
                              s < static_cast<int>(slice_transports_.size()) && slice_transports_[s];
      if (sum_in_3lc) {
        for (int q = 0; q < L; ++q) node_inputs[q] = static_cast<const float*>(inputs[q]);
      } else {
        reduce_n(out, inputs.data(), L, n, dtype, op, node_divisor,
                 hierarchical ? nullptr : peer_outs.data(),
                 hierarchical ? 0 : static_cast<int>(peer_outs.size()),
                 fused_finite ? &slices_finite : nullptr);
      }
      if (hierarchical) {
        bool ok = true;
        bool written = false;  // the inter-node stage stored the copies itself
        try {
          written = inter_node(s, out, n, dtype, op, divisor, inter, &residual_offset,
                               &owner_offset, deadline, what, status, &peer_outs,
                               sum_in_3lc ? node_inputs.data() : nullptr, L);
        } catch (const AgreedFailureError& error) {
          // Every rank of this slice's ring raised it; the node's other ranks learn it at
          // the next sync. Our remaining slices' rings still run: their peers expect us.
          ok = false;
          if (failure.empty()) {
            failure = error.what();
            // The node stage already wrote partial sums: say so instead (appended below).
            const std::string flat_claim = "; no rank applied this allreduce";
            const size_t at = failure.find(flat_claim);
            if (at != std::string::npos) failure.erase(at, flat_claim.size());
          }
          failed_[me]->store(epoch_ + 1, std::memory_order_relaxed);
        }
        if (!written && (ok || !zero_copy))
          for (void* dst : peer_outs) std::memcpy(dst, out, n * esize);
      }
      moved += n * esize * peer_outs.size();
    }
    if (L == 1) {
      raise_agreed_failure();  // a lone node rank: its own failure, no flags to read
      continue;
    }
    if (zero_copy) continue;  // results are already in every buffer
    sync("reduce", deadline, what, status);
    raise_agreed_failure();

    // Copy-out: every other slice from its owner.
    for (int s = 0; s < P; ++s) {
      const int owner = s % L;
      if (owner == me || slices.length(s) == 0) continue;
      std::memcpy(mine + slices.begin(s) * esize, source(owner, s), slices.length(s) * esize);
      moved += slices.length(s) * esize;
    }
  }
  // Nobody reads our arena or buffer after this: the caller may reuse both. Zero-copy: every
  // owner has stored its slices into our buffer.
  // A non-finite slice is flagged with the epoch of the final sync, so every node rank reads
  // the same answer after it (and a flag from an earlier collective never matches).
  if (fused_finite && !slices_finite) nonfinite_[me]->store(epoch_ + 1, std::memory_order_relaxed);
  if (L > 1) {
    sync(zero_copy ? "push" : "copy-out", deadline, what, status);
    if (zero_copy) raise_agreed_failure();
  }
  if (fused_finite) {
    bool all = slices_finite;
    for (int q = 0; q < L && all; ++q)
      all = !(L > 1 && nonfinite_[q]->load(std::memory_order_relaxed) == epoch_);
    *finite = all;
  }
  shm_bytes_ += moved;
  return fused_finite;
}

}  // namespace pbm
