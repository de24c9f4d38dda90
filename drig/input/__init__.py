"""drig.input: the parts of the input pipeline, one concept each.

* ``sampling``: which examples fill each class-balanced training batch, a
  pure function of (seed, step); which rows of it each host gets.
* ``labels``: every example's label, read without decoding images (cached).
* ``augmentation``: random flips and rotations keyed by (seed, step, row).
* ``errors``: ``InputPipelineError``.

``drig.input_pipeline`` assembles them into grain pipelines: ``train_iterator``
and ``eval_batches``. Importing this package has no side effects.
"""
