// Error messages built without C++ streams.
//
// Why: c10::str (behind TORCH_CHECK's message arguments) formats numbers with std::ostream, and the
// instantiations of that code land in this extension. On the H200 machine the image's /opt/gcc toolchain
// compiled its own copy of libstdc++'s number formatting (std::ostream::_M_insert<long>) into the
// extension, and every argument error then died with SIGSEGV against the process's libstdc++ while
// formatting its first integer (bench/results/nvidia-h200-native-errors.txt). Here numbers go through
// std::to_string / snprintf and torch types through their own libc10 string functions, and the check
// macros hand c10 one finished C string, which it passes on without a stream: no stream code of ours runs
// on an argument-error path, whatever compiler built us (checked with objdump on this build). Types with no
// put() overload (bool, char, other enums) do not compile, rather than print differently from c10.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace seer::msg {

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
template <typename T,
          std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>, int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) {  // as an ostream prints it: %g, 6 significant digits
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void put(std::string& s, float v) { put(s, static_cast<double>(v)); }
inline void put(std::string& s, c10::DeviceType v) { s += c10::DeviceTypeName(v, /*lower_case=*/true); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }
inline void put(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, c10::IntArrayRef v) {  // "[2, 3]", as c10 prints an ArrayRef
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (put(s, args), ...);
  return s;
}

// ValueError with a finished message. Passed as one C string: c10 hands that on as it is, where a
// std::string argument would go through c10::str's generic (ostringstream) path, compiled into this
// extension like any template.
[[noreturn]] inline void throw_value_error(const std::string& message) {
  TORCH_CHECK_VALUE(false, message.c_str());
}

}  // namespace seer::msg
