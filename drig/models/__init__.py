"""drig.models: Inception-v3, the DR classifier, their variables and weight files.

Import the submodules you need (importing this package has no side effects):

* ``inception_v3.InceptionV3`` and ``classifier.DRClassifier``
  (``classifier.build_model`` from a config section); ``layer_access`` for
  their named layers.
* ``initialization``: random variables, optionally overwritten from a file.
* ``importer``: reads any weight source and puts it into a model; the
  readers are ``keras_weights``, ``torch_weights`` and ``checkpoints``
  (drig's own), sharing ``weight_files``.
* ``runs``: a training workdir read back (its config and kept checkpoints).
"""
