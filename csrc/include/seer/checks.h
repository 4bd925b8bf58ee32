// Argument checks with messages that name the argument. The Python layer validates first;
// these keep the native ops safe when called directly through torch.ops.seer_C.
#pragma once

#include <c10/util/Exception.h>

#define SEER_CHECK_ARG(cond, name, ...) TORCH_CHECK_VALUE((cond), "argument '", name, "': ", __VA_ARGS__)

#define SEER_CHECK_DEVICE(t, name, dev)                                                         \
  SEER_CHECK_ARG((t).device().type() == (dev), name, "expected a tensor on ", (dev), ", got ", \
                 (t).device())

// `t` on the very device of `ref` (same index too), named `ref_name` in the message.
#define SEER_CHECK_SAME_DEVICE(t, name, ref, ref_name)                                                  \
  SEER_CHECK_ARG((t).device() == (ref).device(), name, "expected a tensor on ", (ref).device(), " (the " \
                 "device of '", ref_name, "'), got ", (t).device())

#define SEER_CHECK_DIM(t, name, n) \
  SEER_CHECK_ARG((t).dim() == (n), name, "expected a ", (n), "-D tensor, got ", (t).dim(), "-D")
