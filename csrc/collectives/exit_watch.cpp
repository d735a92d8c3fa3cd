#include "exit_watch.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace pbm {

namespace {
std::atomic<bool> armed{false};
}  // namespace

void watch_exit(double seconds, const std::string& message, int status) {
  if (armed.exchange(true)) return;
  const auto wait = std::chrono::duration<double>(seconds > 0 ? seconds : 0.0);
  std::thread([wait, message, status] {
    std::this_thread::sleep_for(wait);
    // Only async-signal-safe calls from here: the interpreter and MPI may be half torn down.
    ssize_t ignored = ::write(STDERR_FILENO, message.data(), message.size());
    (void)ignored;
    ::_exit(status);
  }).detach();
}

}  // namespace pbm
