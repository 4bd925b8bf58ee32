"""Triton kernels and their launchers; imported lazily, only when the Triton backend is selected."""
