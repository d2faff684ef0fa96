"""CI tooling: the vendor matrix (matrix.yaml), the workflow/bake generator and the per-leg scripts."""
