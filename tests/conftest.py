"""Test-wide settings, applied before JAX starts (subprocesses inherit them):
8 simulated CPU devices for the sharding tests, CPU only even where libtpu is installed
(it is, for ahead-of-time TPU compilation), and libtpu allowed in several processes."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
