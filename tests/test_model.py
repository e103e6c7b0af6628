"""bench/model.py counts what docs/design.md §5 counts, and labels its output as predictions."""

from bench import model


def test_the_model_counts_the_design_flops():
    b, c, d = 1024, 1_000_000, 512
    gemm = 2.0 * b * c * d
    # forward 1 GEMM; each backward kernel one cosine recompute per 256-wide slice of D and its GEMM
    assert sum(k.flops for k in model.triton_kernels(b, c, 256, "bf16")) == 5 * 2.0 * b * c * 256  # 10·B·C·D
    assert sum(k.flops for k in model.triton_kernels(b, c, d, "bf16")) == 7 * gemm  # D = 2 slices: 14·B·C·D
    assert sum(k.flops for k in model.cuda_kernels(b, c, d, "bf16")) == 4 * gemm


def test_predictions_are_no_faster_than_the_matmul_floor_and_say_what_they_are():
    gpu = model.GPUS["H100"]
    for classes in (100_000, 1_000_000):
        floor = model.floor_seconds(gpu, 1024, classes, 512, "bf16")
        for total, _ in model.predict(gpu, 1024, classes, 512, "bf16").values():
            assert total >= floor
    assert model.table("H100", 1024, 512, [100_000], "bf16").startswith("PREDICTED")


def test_the_gpu_is_known_by_its_name():
    assert model.gpu_named("NVIDIA H100 80GB HBM3") == "H100"
    assert model.gpu_named("NVIDIA H200") == "H200"
    assert model.gpu_named("AMD EPYC (2 cores)") is None
