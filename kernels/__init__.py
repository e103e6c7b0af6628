"""Triton kernels of marginfused, installed as `marginfused.kernels`."""
