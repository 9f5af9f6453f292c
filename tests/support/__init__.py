"""Shared test support: fixtures and file builders used across the suite (not tests themselves).

- ``official``: the official INSIGHT state_dict layout and forward pass, written from the paper;
- ``h5_layouts``: feature h5 files laid out exactly as INSIGHT, CLAM and TRIDENT write them;
- ``synth_cohort``: a small synthetic feature cohort for training tests;
- ``cohort_faults``: faults injected into predict-cohort's Ray workers (a worker setup hook);
- ``export_helpers``: small models and ONNX graph checks for the export tests;
- ``tolerances``: the one tolerance table (re-exported from tests/kernels/tolerances.py).
"""
