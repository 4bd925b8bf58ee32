// A minimal test harness for the C++ unit tests (no external test framework needed).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace seer_test {

struct Case {
  std::string name;
  std::function<void()> fn;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { cases().push_back({name, std::move(fn)}); }
};

inline int& failures() {
  static int n = 0;
  return n;
}

inline int run_all() {
  for (const auto& c : cases()) {
    const int before = failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      std::printf("  exception: %s\n", e.what());
      ++failures();
    }
    std::printf("%s %s\n", failures() == before ? "PASS" : "FAIL", c.name.c_str());
  }
  std::printf("%zu cases, %d failed checks\n", cases().size(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace seer_test

#define SEER_TEST(name)                                                 \
  static void name();                                                   \
  static ::seer_test::Register name##_registration(#name, &name);       \
  static void name()

#define EXPECT(cond)                                                                          \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      std::printf("  %s:%d: expected %s\n", __FILE__, __LINE__, #cond);                       \
      ++::seer_test::failures();                                                              \
    }                                                                                         \
  } while (0)

#define EXPECT_THROWS(stmt)                                                                   \
  do {                                                                                        \
    bool thrown = false;                                                                      \
    try {                                                                                     \
      stmt;                                                                                   \
    } catch (const std::exception&) {                                                         \
      thrown = true;                                                                          \
    }                                                                                         \
    if (!thrown) {                                                                            \
      std::printf("  %s:%d: expected an exception from %s\n", __FILE__, __LINE__, #stmt);    \
      ++::seer_test::failures();                                                              \
    }                                                                                         \
  } while (0)
