"""pymoe/backend/cdef_macros.py: the headers declare each float operation once, in a macro over the
element type; the expansion cffi reads declares it for float and double, as the headers' comments
show."""
import os

from helpers import REPO
from pymoe.backend.cdef_macros import cdef_block, expand


def flat(text: str) -> str:
    return " ".join(text.split())


def test_the_c_header_expands_to_the_documented_declarations():
    text = flat(cdef_block(os.path.join(REPO, "csrc", "pymoe.h")))
    assert ("int pymoe_dispatch_f32(float *expert_in, const float *x, const int64_t *slot_owner, "
            "const float *weight, int64_t T, int64_t K, int64_t E, int64_t C, int64_t D);"
            in text)
    assert ("int pymoe_combine_f64(double *y, const double *expert_out, "
            "const int64_t *expert_index, const int64_t *position, const double *weight, "
            "int64_t T, int64_t K, int64_t E, int64_t C, int64_t D);" in text)
    for op in ("top_k", "dispatch", "combine", "gate_grad", "dispatch_naive", "combine_naive",
               "gate_grad_naive"):
        for suffix, real in (("_f32", "float"), ("_f64", "double")):
            decl = text.split(f"int pymoe_{op}{suffix}(", 1)[1].split(";", 1)[0]
            assert real in decl and ("double" if real == "float" else "float") not in decl
    assert "##" not in text and "PYMOE_FLOAT_OPS" not in text and "PYMOE_ROW_OPS" not in text
    assert "#define PYMOE_OK 0" in text  # object-like macros stay for cffi


def test_the_cuda_header_expands_to_the_documented_declarations():
    text = flat(cdef_block(os.path.join(REPO, "csrc", "cuda", "pymoe_cuda.h")))
    assert ("int pymoe_cuda_dispatch_f32(float *expert_in, const float *x, "
            "const int64_t *slot_owner, const float *weight, int64_t T, int64_t K, int64_t E, "
            "int64_t C, int64_t D, int *status, void *stream);" in text)
    for op in ("softmax_top_k", "top_k", "dispatch", "combine", "gate_grad"):
        assert f"int pymoe_cuda_{op}_f32(" in text and f"int pymoe_cuda_{op}_f64(" in text
    assert "##" not in text and "PYMOE_CUDA_FLOAT_OPS" not in text


def test_expand_pastes_and_rescans():
    text = ("#define INNER(T, S) T f##S(T x);\n"
            "#define OUTER(T, S) INNER(T, S) \\\n INNER(T, _naive##S)\n"
            "OUTER(float, _f32)\n")
    assert flat(expand(text)) == "float f_f32(float x); float f_naive_f32(float x);"
