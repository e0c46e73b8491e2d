"""Test-wide setup: eight simulated CPU devices, set before JAX starts."""

import os

# Sharding tests need several devices; single-device tests use the first one.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
