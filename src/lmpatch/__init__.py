"""lmpatch: edit what a language model knows, as patches you can save, apply and revert."""
from lmpatch.errors import LmpatchError
from lmpatch.model import LoadedModel, ModelSpec, load_model, wrap_model
from lmpatch.request import EditRequest, Probe

__version__ = "0.1.0"

__all__ = ["EditRequest", "LmpatchError", "LoadedModel", "ModelSpec", "Probe", "load_model", "wrap_model", "__version__"]
