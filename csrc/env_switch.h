// Two-valued environment switches that turn one kernel choice off for A/B
// runs of one build (PYFASTATTN_CPU_FEW_ROWS, PYFASTATTN_CPU_KV_PACK). Callers
// read them once per process (a function-local static).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace pyfastattn {

// Whether `name` is set to `alt`. Unset or `dflt`: false; anything else is a
// ValueError naming the variable, both accepted values and the value found.
inline bool env_switch_is(const char* name, const char* dflt, const char* alt) {
  const char* env = std::getenv(name);
  const std::string v = env ? env : "";
  TORCH_CHECK_VALUE(v.empty() || v == dflt || v == alt, name, " must be '", dflt, "' (the default) or '", alt,
                    "', got '", v, "'");
  return v == alt;
}

}  // namespace pyfastattn
