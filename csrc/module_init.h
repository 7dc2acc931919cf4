// Module creation shared by the CPU and CUDA extensions: an otherwise empty Python module (the
// ops register themselves through TORCH_LIBRARY) with a `source_hash` attribute.
//
// The digest of csrc/ a binary was built from (-DBREGMAN_FUSED_SOURCE_HASH=..., see
// bregman_fused/_build.py [note: stale builds]) is kept in the file behind a marker, so that Python
// can compare it with the sources beside the binary before importing it.
#pragma once

#include <Python.h>

#ifndef BREGMAN_FUSED_SOURCE_HASH
#define BREGMAN_FUSED_SOURCE_HASH unknown
#endif
#define BF_HASH_STR_(x) #x
#define BF_HASH_STR(x) BF_HASH_STR_(x)

namespace bregman {

inline constexpr char kSourceHashMarker[] = "bregman_fused_source_hash:";
inline constexpr char kSourceHashMarked[] = "bregman_fused_source_hash:" BF_HASH_STR(BREGMAN_FUSED_SOURCE_HASH);

// PyModule_Create(def) plus the attribute; nullptr (with the Python error set) on failure.
inline PyObject* create_module(PyModuleDef* def) {
  PyObject* module = PyModule_Create(def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "source_hash", kSourceHashMarked + sizeof(kSourceHashMarker) - 1) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

}  // namespace bregman
