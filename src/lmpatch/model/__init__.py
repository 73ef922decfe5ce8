"""Loading models and finding where things are inside them."""
from lmpatch.model.loading import LoadedModel, load_model, wrap_model
from lmpatch.model.spec import ModelSpec

__all__ = ["LoadedModel", "ModelSpec", "load_model", "wrap_model"]
