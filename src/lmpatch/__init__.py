"""lmpatch: edit what a language model knows, as patches you can save, apply and revert."""
__version__ = "0.1.0"

from lmpatch.api import edit  # noqa: E402
from lmpatch.errors import LmpatchError  # noqa: E402
from lmpatch.eval import evaluate  # noqa: E402
from lmpatch.model import LoadedModel, ModelSpec, load_model, wrap_model  # noqa: E402
from lmpatch.patch import Patch, WeightDelta, compose  # noqa: E402
from lmpatch.request import EditRequest, Probe  # noqa: E402

__all__ = [
    "EditRequest", "LmpatchError", "LoadedModel", "ModelSpec", "Patch", "Probe", "WeightDelta",
    "compose", "edit", "evaluate", "load_model", "wrap_model", "__version__",
]
