"""A stand-in for get-pip.py, which ansible-test downloads from ci-files.testing.ansible.com
(unreachable from this machine) to put pip into each sanity test's empty virtualenv: pip
from this interpreter's own ensurepip, then ``pip install ARGS`` (the pinned pip and
friends, from the package index pip is configured with)."""

import ensurepip
import importlib
import runpy
import sys

ensurepip.bootstrap(upgrade=True)
importlib.invalidate_caches()
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.argv = ["pip", "install", *args]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
