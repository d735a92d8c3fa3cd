// A small persistent thread pool for the element-wise kernels (optimizers, loss scaling).
//
// Why not OpenMP: linking libgomp next to torch's libgomp/libiomp and MPI's own threads is
// a frequent source of crashes and oversubscription; a private pool of std::threads has no
// link-time dependency and lets the caller pick the thread count per call (torch's
// get_num_threads() by default, 1 rank per core under MPI).
#pragma once

#include <cstddef>
#include <functional>

namespace pbm {

// Elements below which a kernel stays on the calling thread: waking a worker costs a few
// microseconds, which 64 Ki float32 elements (256 KiB, about 10-20 us of memory traffic)
// amortize.
constexpr size_t kMinElementsPerThread = size_t{1} << 16;

// Splits [0, count) into at most num_threads contiguous ranges (boundaries aligned to 16
// elements = one 64-byte cache line of float32, so threads never share a line) and calls
// fn(begin, end, part) for each, part 0 on the calling thread. Returns the number of parts
// used. Calls are serialized: one parallel region runs at a time in the process.
int parallel_for(size_t count, int num_threads,
                 const std::function<void(size_t begin, size_t end, int part)>& fn);

// Hardware threads available to this process (at least 1).
int available_threads();

}  // namespace pbm
