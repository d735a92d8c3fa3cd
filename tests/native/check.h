// A minimal test harness for the native test binary (tests/native/, run by
// tests/test_native.py): cases register themselves by suite, CHECK fails the case with
// the file, line and expression, expect_error checks the message of a PbmError.
#pragma once

#include <cstdio>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "common/errors.h"

namespace check {

struct Failure {
  std::string message;
};

struct Case {
  const char* suite;
  const char* name;
  void (*run)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(const char* suite, const char* name, void (*run)()) { registry().push_back({suite, name, run}); }
};

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  std::ostringstream message;
  message << file << ":" << line << ": " << what;
  throw Failure{message.str()};
}

// Runs `body`, which must throw pbm::PbmError whose message contains `fragment`.
inline void expect_error(const std::function<void()>& body, const std::string& fragment, const char* file,
                         int line) {
  try {
    body();
  } catch (const pbm::PbmError& error) {
    if (std::string(error.what()).find(fragment) == std::string::npos)
      fail(file, line, "error \"" + std::string(error.what()) + "\" does not mention \"" + fragment + "\"");
    return;
  }
  fail(file, line, "no PbmError mentioning \"" + fragment + "\"");
}

}  // namespace check

#define CHECK_CASE(suite, name)                                                        \
  static void suite##__##name();                                                       \
  static const check::Register register_##suite##__##name(#suite, #name, suite##__##name); \
  static void suite##__##name()

#define CHECK(condition)                                             \
  do {                                                               \
    if (!(condition)) check::fail(__FILE__, __LINE__, #condition);   \
  } while (0)

// CHECK with context streamed into the message on failure only.
#define CHECK_THAT(condition, context)                                       \
  do {                                                                       \
    if (!(condition)) {                                                      \
      std::ostringstream check_context_;                                     \
      check_context_ << #condition << " (" << context << ")";                \
      check::fail(__FILE__, __LINE__, check_context_.str());                 \
    }                                                                        \
  } while (0)

#define EXPECT_ERROR(statement, fragment) check::expect_error([&] { statement; }, fragment, __FILE__, __LINE__)
