"""The compiled media fast path (turnserver/_datapath.c). Everything else is in pyproject.toml.

The extension is optional: where it cannot be built, the package installs without it and
turnserver/io/datapath.py uses the pure-Python twin.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "turnserver._datapath",
            sources=["turnserver/_datapath.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
            optional=True,
        )
    ],
)
