"""What a model is: how an untrusted one is loaded, its identity, its layers, the hooks that read them.

* :mod:`guard.model.loading`: the model file and its ``state_dict`` (``weights_only=True``), optional
  input normalisation inside the model (:class:`Normalized`);
* :mod:`guard.model.identity`: :func:`fingerprint`, the SHA-256 a profile is bound to;
* :mod:`guard.model.layers`: what a probe forward finds: input shape, class count, classifier, the
  feature layer, the inner layer, a transformer's token blocks;
* :mod:`guard.model.hooks`: :class:`HookSet` and :class:`FeatureTap`, hooks that always remove themselves;
* :mod:`guard.model.evaluation`: labels and accuracy on a batch, :func:`frozen`.
"""

from guard.model.evaluation import accuracy, frozen, predict, validate_labels
from guard.model.hooks import FeatureTap, HookSet
from guard.model.identity import fingerprint
from guard.model.layers import (
                                feature_layer,
                                find_classifier,
                                inner_layer,
                                inner_layer_reason,
                                input_shape,
                                num_classes,
                                pool_features,
                                probe_input,
                                token_blocks,
                                token_map,
                                validate_input_shape,
)
from guard.model.loading import Normalized, load_model, load_state_dict, model_class, parse_normalize

__all__ = ["accuracy", "feature_layer", "FeatureTap", "find_classifier", "fingerprint", "frozen", "HookSet",
           "inner_layer", "inner_layer_reason", "input_shape", "load_model", "load_state_dict", "model_class",
           "Normalized", "num_classes", "parse_normalize", "pool_features", "predict", "probe_input", "token_blocks",
           "token_map", "validate_input_shape", "validate_labels"]
