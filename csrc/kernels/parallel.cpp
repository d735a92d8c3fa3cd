#include "kernels/parallel.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace pbm {
namespace {

class ThreadPool {
 public:
  // Runs task(i) for i in [0, parts): i = 0 on the caller, the rest on workers.
  void run(int parts, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> region(region_mutex_);
    while (static_cast<int>(workers_.size()) < parts - 1) {
      const int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id] { worker_loop(id); });
      // Detached: the pool lives for the whole process (see pool()); joining at exit could
      // deadlock against interpreter shutdown.
      workers_.back().detach();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      parts_ = parts;
      remaining_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    task(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return remaining_ == 0; });
    task_ = nullptr;
  }

 private:
  void worker_loop(int id) {
    unsigned long long seen = 0;
    for (;;) {
      const std::function<void(int)>* task = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= parts_) continue;  // not needed in this region
        task = task_;
      }
      (*task)(id);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --remaining_;
      }
      done_.notify_one();
    }
  }

  std::mutex region_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  int parts_ = 0;
  int remaining_ = 0;
  unsigned long long generation_ = 0;
};

ThreadPool* g_pool = nullptr;
std::once_flag g_atfork_once;

// A forked child (e.g. a DataLoader worker) inherits the pool object but not its threads:
// give it a fresh pool. The old one is leaked on purpose (its mutexes may be held).
void reset_pool_in_child() { g_pool = new ThreadPool(); }

ThreadPool& pool() {
  std::call_once(g_atfork_once, [] {
    g_pool = new ThreadPool();
    pthread_atfork(nullptr, nullptr, &reset_pool_in_child);
  });
  return *g_pool;
}

}  // namespace

int available_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

int parallel_for(size_t count, int num_threads,
                 const std::function<void(size_t, size_t, int)>& fn) {
  constexpr size_t kAlign = 16;
  size_t parts = std::max<size_t>(1, std::min<size_t>(std::max(num_threads, 1),
                                                      count / kMinElementsPerThread));
  if (parts == 1) {
    fn(0, count, 0);
    return 1;
  }
  const size_t per_part = ((count + parts - 1) / parts + kAlign - 1) / kAlign * kAlign;
  parts = (count + per_part - 1) / per_part;
  pool().run(static_cast<int>(parts), [&](int part) {
    const size_t begin = static_cast<size_t>(part) * per_part;
    const size_t end = std::min(count, begin + per_part);
    fn(begin, end, part);
  });
  return static_cast<int>(parts);
}

}  // namespace pbm
