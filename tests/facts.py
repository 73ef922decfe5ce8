"""Edit requests and key/residual problems shared by the locate-and-edit test modules."""
from __future__ import annotations

import torch

import lmpatch
from lmpatch.methods.locate.solve import KeyCovariance

REQS = [
    lmpatch.EditRequest(prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                        target_new="Rome", target_true="Paris"),
    lmpatch.EditRequest(prompt="Mount Fuji is in", subject="Mount Fuji", target_new="Peru", target_true="Japan"),
    lmpatch.EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                        target_new="English", target_true="French"),
]
# MEMIT-family settings for tiny models: no statistics (C0 = I; tiny keys have norm ~0.1-1,
# so λ = 1 writes a good share), short optimisation.
FAST = dict(mom2_adjustment=False, mom2_update_weight=1.0, v_steps=3, template_lengths=((3, 2),))


def key_problem(seed=0, n=4, d_ff=12, d=5, samples=200):
    """A random preserved-key covariance, n keys and their residuals, float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, d_ff, generator=g, dtype=torch.float64)
    cov = KeyCovariance(x.T @ x / samples)
    keys = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    residuals = torch.randn(n, d, generator=g, dtype=torch.float64)
    return cov, keys, residuals
