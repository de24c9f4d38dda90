"""Batch attribution of a trained DR grader (``python -m drig.analyze``) and its experiments.

The job, from the top down (imports point one way: down this list, and to the
experiments below it):

* ``job``: ``run_analysis(config, workdir)``, the orchestration: config
  check, shards per host, progress, then host 0's report.
* ``validation``: ``validate_config(config)``, every field checked before
  anything is loaded, compiled or written.
* ``report``: host 0's last stage, from the shards to report.md/.html and
  metrics.json; ``report_sections`` (the figures and experiments) and
  ``report_document`` (Markdown and HTML side by side).
* ``attributor``: one shard's attribution on the local devices.
* ``model_source``, ``images``: the model and the images the config names.
* ``quantity_specs``, ``shards``, ``files``, ``errors``: the quantities, the
  shard files, atomic writes, and the errors every module raises.

The experiments, usable on their own: ``localization`` (lesion localisation
scores), ``randomisation`` (re-initialised weights), ``counterfactuals``,
``linearity`` and ``figures``.

Importing this package imports none of them.
"""
