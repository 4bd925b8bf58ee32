// Argument checks with messages that name the argument. The Python layer validates first;
// these keep the native ops safe when called directly through torch.ops.seer_C.
#pragma once

#include "seer/message.h"

// ValueError "argument '<name>': <message parts>" unless cond; the parts are formatted without C++ streams
// (seer/message.h says why).
#define SEER_CHECK_ARG(cond, name, ...)                                                               \
  do {                                                                                                \
    if (C10_UNLIKELY(!(cond))) ::seer::msg::throw_value_error(::seer::msg::cat("argument '", name, "': ", \
                                                                               __VA_ARGS__));         \
  } while (0)

#define SEER_CHECK_DEVICE(t, name, dev)                                                         \
  SEER_CHECK_ARG((t).device().type() == (dev), name, "expected a tensor on ", (dev), ", got ", \
                 (t).device())

// `t` on the very device of `ref` (same index too), named `ref_name` in the message.
#define SEER_CHECK_SAME_DEVICE(t, name, ref, ref_name)                                                  \
  SEER_CHECK_ARG((t).device() == (ref).device(), name, "expected a tensor on ", (ref).device(), " (the " \
                 "device of '", ref_name, "'), got ", (t).device())

#define SEER_CHECK_DIM(t, name, n) \
  SEER_CHECK_ARG((t).dim() == (n), name, "expected a ", (n), "-D tensor, got ", (t).dim(), "-D")
