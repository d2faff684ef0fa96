"""Vendor backends of portable_rl, imported as ``portable_rl.backends.<name>``.

Every vendor fact (device visibility, collective library env, kernels, images, versions) lives in one of
these packages. The rest of portable_rl talks to them only through ``portable_rl.platform.Platform``.
"""
