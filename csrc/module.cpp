// Entry point of the extension stp_fast._C (FlashAttention-3 style).
//
// The module has no methods: importing it loads the shared library, whose static
// TORCH_LIBRARY_IMPL blocks register the CPU (and, in CUDA builds, CUDA) kernels of the private
// ops that stp_fast/ops/_ext_schemas.py defines.  stp_fast._ext.load() does the import.
#include <Python.h>

namespace {

PyModuleDef stp_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",  // m_name
    "stp_fast compiled kernels; registers implementations with torch.library on import.",  // m_doc
    -1,       // m_size
    nullptr,  // m_methods
    nullptr,  // m_slots
    nullptr,  // m_traverse
    nullptr,  // m_clear
    nullptr,  // m_free
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&stp_fast_c_module); }
