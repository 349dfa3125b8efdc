// Environment switches that turn one kernel choice off (or force it) for A/B
// runs of one build and for tests (PYFASTATTN_CPU_FEW_ROWS,
// PYFASTATTN_CPU_KV_PACK). Callers read them once per process (a
// function-local static).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <string>

namespace pyfastattn {

// Which of `values` `name` is set to, as its index; unset is the first (the
// default). Anything else is a ValueError naming the variable, every accepted
// value and the value found.
inline int env_choice(const char* name, std::initializer_list<const char*> values) {
  const char* env = std::getenv(name);
  const std::string v = env ? env : "";
  if (v.empty()) return 0;
  std::string accepted;
  int i = 0, n = int(values.size());
  for (const char* x : values) {
    if (v == x) return i;
    accepted += std::string(i == 0 ? "'" : i + 1 == n ? " or '" : ", '") + x + (i == 0 ? "' (the default)" : "'");
    ++i;
  }
  TORCH_CHECK_VALUE(false, name, " must be ", accepted, ", got '", v, "'");
  return 0;
}

// Whether `name` is set to `alt` (unset or `dflt`: false).
inline bool env_switch_is(const char* name, const char* dflt, const char* alt) {
  return env_choice(name, {dflt, alt}) == 1;
}

}  // namespace pyfastattn
