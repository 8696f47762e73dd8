"""Reference PEM (Prototype-based Efficient MaskFormer, CVPR 2024) model built on ``pem_kernels``.

Submodules are imported explicitly (for example ``pem.metrics``, ``pem.matcher``,
``pem.criterion``); importing the package itself loads nothing else.
"""
