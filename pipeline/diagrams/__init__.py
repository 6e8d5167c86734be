"""The docs' diagrams, generated so they cannot go stale: the pipeline from dvc.yaml and the
model from params.yaml. ``python -m pipeline.diagrams`` rewrites them in the Markdown files."""
