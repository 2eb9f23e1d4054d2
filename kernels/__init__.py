"""Triton kernels of autoregembed_fast, installed as the subpackage `autoregembed_fast.kernels`."""
