"""Mosaic GPU building blocks shared by the kernels: row gathers (cp.async, TMA) and reduce-adds."""
