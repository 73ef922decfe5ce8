"""lmpatch: edit what a language model knows, as patches you can save, apply and revert."""
import os as _os

# Idle OpenMP threads spin briefly, then sleep. Spinning for long (the default policy)
# made every forward pass ~25x slower on a 2-core CPU shared with any other busy process;
# sleeping at once (PASSIVE) wakes the threads for each of the thousands of small
# operations of an edit's passes. A spin of 3,000 rounds (~30 us) between the two was
# measured on 2 cores: a ROME edit 13% faster alone, 15-40% slower next to a process
# that keeps one core busy (docs/speed.md). GOMP_SPINCOUNT=0 is the pure sleeping policy.
# Only takes effect when lmpatch is imported before torch; the environment can override it.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("GOMP_SPINCOUNT", "3000")
# oneDNN (bfloat16 passes, packed weights) builds a kernel for every input shape it meets
# and keeps it in two caches, ideep's and oneDNN's own, 1,024 entries each by default. An
# edit's passes meet a new shape with nearly every batch (the row count is the batch's
# tokens), so a 10,000-edit UltraEdit run grew by about 3 GB of kernels it never used
# again. 128 of each hold what a ROME edit's passes reuse (64 made it ~5% slower) and
# bound the growth (docs/speed.md). Read at oneDNN's first use, so as above.
_os.environ.setdefault("LRU_CACHE_CAPACITY", "128")
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

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
