"""The maths of INSIGHT, once: the head reference, Otsu's threshold and the pooling family.

Holds: ``reference`` (the float reference of the head, the ground truth the Triton kernels and
the ONNX export are tested against), ``otsu`` (the per-slide threshold), ``pooling`` (SmoothMax,
LSE-LBA, masked max/mean and the one threshold + pool assembly).
May import: torch, ``fastinsight.errors``; the Triton kernels (``fastinsight.kernels``) only
lazily, inside a function, when the Triton implementation is chosen. Never models/, predict/, cli/.
"""
