"""The few libggml-base functions the converter calls, from our own build.

Like llama_cpp/llama_cpp.py: ctypes declarations only. Quantization goes
through ggml's own quantizers (never a re-implementation), and calibration
reads graph tensors in its eval callback.
"""

from __future__ import annotations

import ctypes
import functools

from llama_sparse import lib_dir

GGML_TYPE_F32 = 0

# void (*ggml_to_float_t)(const void * x, float * y, int64_t k)
ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class TypeTraits(ctypes.Structure):  # struct ggml_type_traits
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ToFloat),
        ("from_float_ref", ctypes.c_void_p),
    ]


@functools.cache
def ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
    p, i64, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    for name, restype, argtypes in (
        # size_t ggml_quantize_chunk(type, const float * src, void * dst, start, nrows, n_per_row,
        #                            const float * imatrix)
        ("ggml_quantize_chunk", size, [ctypes.c_int, p, p, i64, i64, i64, p]),
        ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
        # const struct ggml_type_traits * ggml_get_type_traits(enum ggml_type type)
        ("ggml_get_type_traits", ctypes.POINTER(TypeTraits), [ctypes.c_int]),
        ("ggml_get_name", ctypes.c_char_p, [p]),
        ("ggml_nelements", i64, [p]),
        ("ggml_nrows", i64, [p]),
        ("ggml_is_contiguous", ctypes.c_bool, [p]),
        # void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data,
        #                              size_t offset, size_t size)
        ("ggml_backend_tensor_get", None, [p, p, size, size]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
