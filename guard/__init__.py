"""guard: inference-time backdoor defense for PyTorch models served with TorchServe.

The public surface is small: load a model, scan it into a :class:`Profile`, wrap it in a
:class:`Guard`. Everything else is an implementation module.
"""

from .errors import GuardError, InputError, ModelError, ProfileError, ProfileMismatch
from .model import FeatureTap, fingerprint, load_model
from .online import Decision, Guard
from .profile import Profile
from .scan import NeuralCleanse, build_profile

__version__ = "0.1.0"

__all__ = ["Decision", "FeatureTap", "Guard", "GuardError", "InputError", "ModelError", "NeuralCleanse",
           "Profile", "ProfileError", "ProfileMismatch", "build_profile", "fingerprint", "load_model"]
