"""The performance model as code: what each kernel of the fused backends computes, moves and issues,
and the time that predicts on a given GPU. Every figure here is a PREDICTION from published
figures and counted work, never a measurement; `python -m bench` and bench/gpu_session.sh measure.

    python -m bench.model [--gpu H100] [--batch 1024] [--dim 512] [--classes 100000 1000000 4000000] [--dtype bf16]
    python -m bench.model --from-sass     # recompile the kernels and rewrite bench/sass_counts.json

What is counted, per kernel, from the code (docs/design.md §5):
- FLOPs: every dot of every program iteration, 2·M·N·K.
- HBM bytes: what must leave or enter device memory: W once per pass where the programs sharing
  a W tile run in the same wave (L2 serves the rest), the outputs once, and B×chunk tiles of the
  `cuda` backend only where its chunk's working set outgrows L2.
- L2 bytes: each program's operand reads, tile by tile, as the code loads them (a tile resident in
  shared memory is read once per program; a streamed one once per iteration).
- Instructions issued (the Triton kernels): per warp per iteration of the kernel's main loop, read
  from its SASS (bench/sass.py; cached in bench/sass_counts.json, a read of compiled code).
- Launches (the `cuda` backend): per chunk, each kernel and GEMM.

A kernel's time is the largest of its terms, plus its launch gaps:
- FLOP: its dots on the tensor cores at MATMUL_EFFICIENCY of peak and at the efficiency its wgmma
  shape allows (`wgmma_efficiency`), whole waves of programs (the busiest SM's share);
- HBM and L2: bytes over bandwidth;
- issue: instructions over 4 warp schedulers × 1 instruction per cycle × SMs × the boost clock;
- serial (Triton kernels at one program per SM): the phases of a loop iteration one after another,
  each the larger of its tensor-core time and its issue time. A program's softmax or gradient
  epilogue needs its cosine MMAs' result, and its gradient MMA needs the epilogue's tile; with one
  program per SM (the accumulators take more than half the registers) no other program's MMAs fill
  the tensor cores meanwhile, and Triton does not overlap one program's warpgroups (no ping-pong);
- the `cuda` backend, as a whole, takes at least its launches' host time where no CUDA graph holds
  its chunk loop.

Which kernels: `triton` is the flash-attention structure of kernels/ (K = V = W): a fused forward +
dX kernel (a batch tile against streamed W tiles, online softmax, O += P̃·W in D slices), a dW
kernel (a class tile of W against streamed x tiles, cosines recomputed from the saved log-sum-exp)
and one norms pre-pass, each flash kernel modelled in the configuration kernels/configs.py gives it
at the D asked for (its tile resident, or D streamed so that it is read again with every tile of
the other), with the issue counts of that configuration's own SASS. `cuda-as-built` is csrc/cuda.cu as
it is (each pass its chunk, `cuda_forward_chunk_classes` and `cuda_chunk_classes`, the dX GEMM
split over its depth, bfloat16 S and gradient tiles for bfloat16 inputs, the norms of x and W once,
in the forward, kept for the backward, 2 launches per chunk forward and 5 backward, no CUDA graph);
`cuda` is the chunked backend as it would be tuned beyond that (16-bit S for float16 too, the chunk
loop in a CUDA graph).
"""

from __future__ import annotations

from .cuda import cuda_kernels, gemm_fill
from .gpus import BYTES, GPUS, HOST_LAUNCH_S, LAUNCH_GAP_S, MATMUL_EFFICIENCY, Gpu, gpu_named
from .kernel import Dot, Kernel, wgmma_efficiency, wgmma_n
from .predict import (AS_BUILT, Prediction, floor_seconds, load_counts, main, predict, predict_backends,
                      table)
from .triton import (flash_kernels, flash_tiles, iteration_dots, programs_per_sm, sass_label, sass_sources,
                     streams_d)

__all__ = ["AS_BUILT", "BYTES", "Dot", "GPUS", "Gpu", "HOST_LAUNCH_S", "Kernel", "LAUNCH_GAP_S", "MATMUL_EFFICIENCY",
           "Prediction", "cuda_kernels", "flash_kernels", "flash_tiles", "floor_seconds",
           "gemm_fill", "gpu_named", "iteration_dots", "load_counts", "main", "predict", "predict_backends", "programs_per_sm", "sass_label", "sass_sources", "streams_d",
           "table", "wgmma_efficiency", "wgmma_n"]
