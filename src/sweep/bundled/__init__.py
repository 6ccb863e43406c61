"""Kernel repositories shipped with sweep (the `kernels` library's local layout), for machines without the Hub.

Each folder is loaded by `kernels.LocalLayerRepository`; `build/torch-cuda` makes them CUDA-only, so the
`kernels` library itself refuses them on other devices.
"""
