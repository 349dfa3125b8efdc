// Direct Python entries for the small-call fast paths of pyfastattn.attention
// and pyfastattn.attention_with_kvcache (csrc/attention/fast_call.cpp).
#pragma once

#include <Python.h>

namespace pyfastattn {

// The methods of the pyfastattn._C module (a null-terminated PyMethodDef table).
PyMethodDef* fast_call_methods();

}  // namespace pyfastattn
