"""The one compiled part of hsmctl, optional: ``hsmctl.auditlog._scan``, the byte scan of
verified log collection in C (``hsmctl/auditlog/_scan.c``, linked with the system
libcrypto for SHA-256). Everything else is in pyproject.toml.

``optional=True``: without a compiler or OpenSSL's headers (Debian: gcc, python3-dev,
libssl-dev) the build says so and goes on, and hsmctl runs the same checks in pure
Python (``hsmctl.auditlog.blockscan``), only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hsmctl.auditlog._scan",
            ["hsmctl/auditlog/_scan.c"],
            libraries=["crypto"],
            # -O3: the byte check vectorizes (a quarter of the scan at -O2)
            extra_compile_args=["-O3", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
