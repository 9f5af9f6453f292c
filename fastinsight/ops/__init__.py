"""The maths of INSIGHT, once: the head reference, Otsu's threshold and the pooling family.

Holds: ``reference`` (the float reference of the head, the ground truth the Triton kernels and
the ONNX export are tested against), ``otsu`` (the per-slide threshold), ``pooling`` (SmoothMax,
LSE-LBA, masked max/mean), ``threshold_pool`` (the one threshold + pool assembly, its
implementation -- reference, triton or export -- chosen at construction) and ``graph_ops`` (the
export implementation's primitives, in operators ONNX and TensorRT take).
May import: torch, ``fastinsight.errors``; the Triton kernels (``fastinsight.kernels``) only
lazily, inside a function, when the Triton implementation is chosen. Never models/, predict/, cli/.
"""
