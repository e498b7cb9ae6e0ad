"""ShapesBench: an exact, model-free compositional benchmark on the shapes task."""

from .shapesbench import BENCH_VERSION, CATEGORIES, BenchPrompt, bench_prompts, run_bench

__all__ = ["BENCH_VERSION", "CATEGORIES", "BenchPrompt", "bench_prompts", "run_bench"]
