"""lmpatch: edit what a language model knows, as patches you can save, apply and revert."""
import os as _os

# Idle OpenMP threads sleep instead of spinning: on a small CPU shared with any other busy
# process, spinning threads made every forward pass ~25x slower (measured on 2 cores).
# Only takes effect when lmpatch is imported before torch; the environment can override it.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from lmpatch.api import edit  # noqa: E402
from lmpatch.errors import LmpatchError  # noqa: E402
from lmpatch.eval import evaluate  # noqa: E402
from lmpatch.jobs.debias import debias  # noqa: E402
from lmpatch.jobs.detox import detox  # noqa: E402
from lmpatch.jobs.forget import forget  # noqa: E402
from lmpatch.jobs.secrets import Secret  # noqa: E402
from lmpatch.model import LoadedModel, ModelSpec, load_model, wrap_model  # noqa: E402
from lmpatch.patch import Patch, WeightDelta, compose  # noqa: E402
from lmpatch.request import EditRequest, Probe  # noqa: E402

__all__ = [
    "EditRequest", "LmpatchError", "LoadedModel", "ModelSpec", "Patch", "Probe", "Secret", "WeightDelta",
    "compose", "debias", "detox", "edit", "evaluate", "forget", "load_model", "wrap_model", "__version__",
]
