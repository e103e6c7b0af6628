"""Loading other libraries' checkpoints into marginfused heads.

`marginfused.compat.insightface.load_partial_fc` reads arcface_torch's per-rank Partial FC
checkpoints. This package builds on marginfused and marginfused.distributed; nothing in them
imports it.
"""
