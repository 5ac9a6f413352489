"""Evaluation helpers: nnU-Net's own per-label metrics, comparison tables and PNG overlays."""
