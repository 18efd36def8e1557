"""The cffi declarations of a C header: the text between its `/* cdef-begin */` and
`/* cdef-end */` markers, with its function-like macros expanded.

cffi's cdef takes no macros, but the headers (csrc/pymoe.h, csrc/cuda/pymoe_cuda.h) declare each
float operation once, in a macro over the element type and the name suffix, and instantiate it
for float (`_f32`) and double (`_f64`). This expands those macros the way the C preprocessor
does for the forms the headers use: parameters replaced by the arguments, then `##` pasted,
then the result rescanned for further macros. Object-like macros (`#define PYMOE_OK 0`) stay:
cffi reads those itself. Used by csrc/build_cffi.py (C core) and pymoe.cuda_backend (CUDA).
"""
from __future__ import annotations

import re

_DEFINE = re.compile(r"^[ \t]*#define[ \t]+(\w+)\(([^)]*)\)(.*)$", re.M)


def cdef_block(path: str) -> str:
    """The declarations between the cdef markers of the header at `path`, macros expanded."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return expand(text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0])


def expand(text: str) -> str:
    """`text` with its function-like macro definitions removed and their uses expanded."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)  # comments: a space, as in C
    text = text.replace("\\\n", " ")  # continuation lines joined
    macros: dict[str, tuple[list[str], str]] = {}
    for name, params, body in _DEFINE.findall(text):
        macros[name] = ([p.strip() for p in params.split(",")], body)
    text = _DEFINE.sub("", text)
    if not macros:
        return text
    use = re.compile(r"\b(" + "|".join(macros) + r")\(([^()]*)\)")

    def substitute(m: re.Match) -> str:
        params, body = macros[m.group(1)]
        args = dict(zip(params, (a.strip() for a in m.group(2).split(","))))
        body = re.sub(r"\b\w+\b", lambda w: args.get(w.group(0), w.group(0)), body)
        return re.sub(r"\s*##\s*", "", body)

    for _ in range(8):  # the headers nest two deep
        text, n = use.subn(substitute, text)
        if n == 0:
            return text
    raise ValueError("cdef macros nest deeper than 8 levels")
