// The native test binary of csrc/common and csrc/compression (built and run by
// tests/test_native.py; benchmarks/compression.py uses its bench mode):
//
//   pbm_native_tests list                    suites, one per line
//   pbm_native_tests run [SUITE...]          "PASS suite.case" / "FAIL suite.case: why" per case
//   pbm_native_tests bench FILE COUNT REPEATS
//        3LC encode / decode / decode-add and a float32 -> bfloat16 cast of the COUNT float32
//        of FILE, on this thread; prints one JSON object of median thread-CPU and wall seconds.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "check.h"

int bench_main(int argc, char** argv);

namespace {

int list() {
  std::set<std::string> suites;
  for (const auto& c : check::registry()) suites.insert(c.suite);
  for (const auto& s : suites) std::cout << s << "\n";
  return 0;
}

int run(const std::vector<std::string>& wanted) {
  int failed = 0;
  for (const auto& c : check::registry()) {
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), c.suite) == wanted.end()) continue;
    try {
      c.run();
      std::cout << "PASS " << c.suite << "." << c.name << std::endl;
    } catch (const check::Failure& failure) {
      ++failed;
      std::cout << "FAIL " << c.suite << "." << c.name << ": " << failure.message << std::endl;
    } catch (const std::exception& error) {
      ++failed;
      std::cout << "FAIL " << c.suite << "." << c.name << ": unexpected exception: " << error.what() << std::endl;
    }
  }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "run";
  if (mode == "list") return list();
  if (mode == "bench") return bench_main(argc - 1, argv + 1);
  if (mode == "run") return run(std::vector<std::string>(argv + std::min(argc, 2), argv + argc));
  std::cerr << "usage: pbm_native_tests list | run [SUITE...] | bench FILE COUNT REPEATS\n";
  return 2;
}
