"""``lp.forget`` / ``lmpatch forget``: make a model stop giving away private strings.

The job turns secrets into edit requests (context → refusal, the secret as the answer to
remove), runs one method on all of them at once, and returns its patch with the job's own
measurements before and after in ``patch.metrics["forget"]``:

* ``depn`` - privacy neurons found by integrated gradients and switched off (the paper's
  method; the default);
* ``rome``, ``memit`` - locate-and-edit towards a refusal answer ("private");
* ``ft-ga`` - gradient ascent on the secrets (the usual unlearning baseline);
* ``ft-generic`` - fine-tuning until the model predicts each secret as it would a
  stranger's (needs each secret's ``subject``, the person's name).

The measurements are the extraction rate (greedy completion contains the secret) and,
when asked, the mean exposure (:mod:`lmpatch.eval.privacy`). A job never changes
weights itself: the method computes the patch, the caller decides whether to apply it.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from lmpatch.errors import InvalidRequestError
from lmpatch.eval.privacy import extracted, mean_exposure
from lmpatch.jobs.secrets import REFUSAL, Secret, as_secrets
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch

#: the methods ``forget`` offers, the paper's first
FORGET_METHODS = ("depn", "rome", "memit", "ft-ga", "ft-generic")
#: the methods that train to keep given records (``forget(..., keep=...)``)
KEEPING_METHODS = ("ft-generic",)


def forget(
    model: LoadedModel,
    secrets: Sequence[Secret | dict | tuple],
    method: str = "depn",
    refusal: str = REFUSAL,
    exposure_candidates: int = 0,
    keep: Sequence[Secret | dict | tuple] = (),
    **hparams: Any,
) -> Patch:
    """A patch that makes ``model`` stop completing each secret's context with the secret.

    ``keep`` are records the model must go on completing (other people's, say), for the
    methods that can train to keep them (``ft-generic``); their extraction is measured
    before and after too. ``hparams`` override the method's defaults. ``exposure_candidates`` > 0 also measures
    the mean exposure among that many same-format strings (slow: one scoring pass per
    candidate). The caller's model is left as it was.
    """
    from lmpatch.api import edit

    if method not in FORGET_METHODS:
        raise InvalidRequestError(f"Unknown forget method {method!r}; choose one of {', '.join(FORGET_METHODS)}.")
    secrets = as_secrets(secrets)
    keep = as_secrets(keep) if keep else []
    if keep and method not in KEEPING_METHODS:
        raise InvalidRequestError(
            f"Only {', '.join(KEEPING_METHODS)} can be told what to keep; {method} takes no records to keep."
        )
    if keep:
        hparams["keep"] = tuple((s.context, s.secret) for s in keep)
    requests = [s.request(refusal) for s in secrets]
    before = extracted(model, secrets)
    kept_before = extracted(model, keep) if keep else []
    t0 = time.perf_counter()
    patch = edit(model, requests, method, **hparams)
    seconds = time.perf_counter() - t0
    with patch.applied(model):
        after = extracted(model, secrets)
        kept_after = extracted(model, keep) if keep else []
        exposure_after = mean_exposure(model, secrets, exposure_candidates) if exposure_candidates else None
    exposure_before = mean_exposure(model, secrets, exposure_candidates) if exposure_candidates else None
    patch.metrics["forget"] = {
        "n_secrets": len(secrets), "method": method, "edit_seconds": round(seconds, 2),
        "extraction_before": sum(before) / len(before), "extraction_after": sum(after) / len(after),
        "still_extracted": [s.context for s, hit in zip(secrets, after) if hit],
        "exposure_before": exposure_before, "exposure_after": exposure_after,
        "n_kept": len(keep),
        "kept_before": sum(kept_before) / len(keep) if keep else None,
        "kept_after": sum(kept_after) / len(keep) if keep else None,
    }
    return patch
