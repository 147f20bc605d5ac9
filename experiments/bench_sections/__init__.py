"""Sections of `experiments/bench_kernels.py`: each module exposes `run(flags_dict) -> list[dict]`."""
