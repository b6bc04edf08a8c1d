// How mtp_cy's native libraries were built, and which file a loaded ggml
// backend came from (for system_info()/build_info()).
#pragma once

#ifdef MTP_CY_BACKEND_DL
// ggml and llama are shared libraries next to _core, and the backends (one
// CPU module per instruction-set level, CUDA, ...) are modules that init()
// loads from the package directory.
#define MTP_CY_IS_BACKEND_DL 1
#else
// everything linked statically into _core (the developer build)
#define MTP_CY_IS_BACKEND_DL 0
#endif

#if defined(_WIN32)
#include <windows.h>
// Path of the module (DLL) that holds address `addr`, or NULL.
static inline const char * mtp_cy_module_path(const void * addr) {
    static char buf[4096];
    HMODULE h = NULL;
    if (!addr || !GetModuleHandleExA(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS |
                                     GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                                     (LPCSTR) addr, &h)) {
        return NULL;
    }
    DWORD n = GetModuleFileNameA(h, buf, sizeof(buf));
    return (n > 0 && n < sizeof(buf)) ? buf : NULL;
}
#else
#include <dlfcn.h>
// Path of the shared object that holds address `addr`, or NULL.
static inline const char * mtp_cy_module_path(const void * addr) {
    Dl_info info;
    if (addr && dladdr(addr, &info) && info.dli_fname) {
        return info.dli_fname;
    }
    return NULL;
}
#endif
