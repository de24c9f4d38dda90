"""drig.models: Inception-v3, the DR classifier, layer access and weight importers.

Import the submodules you need (importing this package has no side effects):
``drig.models.inception_v3.InceptionV3``, ``drig.models.classifier.DRClassifier``,
``drig.models.layer_access``, ``drig.models.importer``.
"""
