"""Differentiable ops: one file per family, each Function's backward beside its forward."""
