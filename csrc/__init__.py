"""C++ and CUDA sources of the `cpu` and `cuda` backends, shipped as package data
(`marginfused.csrc`) and JIT-built by `marginfused.extension` on first use."""
