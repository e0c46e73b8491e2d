"""Test-wide setup: eight simulated CPU devices, set before JAX starts."""

import os

# Sharding tests need several devices; single-device tests use the first one.
# A lower XLA backend optimisation level halves compile times of the small test models.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
