"""Evaluation for both ecosystems (docs/evaluation.md): ``metrics`` (shared metric functions),
``volumes`` (nnU-Net prediction folders), ``coco_eval`` (Detectron2/COCO results), ``landmarks``,
``results`` (rows, summaries, CSV/JSON/Markdown), ``evaluate`` (the ``organmtl evaluate``
dispatcher), ``segmentation`` (nnU-Net's own per-label evaluation and the demo's table),
``overlays``, ``curves`` and ``report`` (``organmtl report``)."""
