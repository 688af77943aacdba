"""Build the compiled hot paths (codec and topic trie) with Cython.

FASTMQTT_DEBUG=1 builds with line tracing, bounds checks and ``cython -a``
annotation (HTML next to the .pyx), for profiling and for chasing a crash.
"""

import os
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
DEBUG = os.environ.get("FASTMQTT_DEBUG") == "1"

MODULES = ["_codec", "_trie", "_wal", "_record", "_gcutil"]


def extensions():
    from Cython.Build import cythonize

    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
    cflags = ["-O0", "-g"] if DEBUG else ["-O3"]
    exts = [
        Extension(
            f"fastmqtt.{name}",
            [f"src/fastmqtt/{name}.pyx"],
            define_macros=macros,
            extra_compile_args=cflags,
        )
        for name in MODULES
        if (HERE / "src" / "fastmqtt" / f"{name}.pyx").exists()
    ]
    directives = {
        "language_level": "3",
        "embedsignature": True,
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "cdivision": True,
        "linetrace": DEBUG,
        "profile": DEBUG,
    }
    return cythonize(exts, compiler_directives=directives, annotate=DEBUG)


setup(ext_modules=extensions())
