"""Method names -> how to run them, with their hyperparameter dataclass.

Methods register here by name only; the table is built on first use so importing
lmpatch stays cheap and no method module is loaded before it is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from lmpatch.errors import InvalidRequestError


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    hparams_cls: type
    run: Callable[..., Any]  # (model, requests, hparams) -> Patch


@lru_cache(maxsize=1)
def _table() -> dict[str, MethodInfo]:
    from lmpatch.methods import alphaedit, emmet, ft, kn, memit, pmet, rome

    def rome_run(name):
        return lambda model, requests, hp: rome.apply_rome(model, requests, hp, method=name)

    def ft_run(name):
        return lambda model, requests, hp: ft.apply_ft(model, requests, hp, method=name)

    infos = [
        MethodInfo("rome", "ROME: rank-one locate-and-edit of one MLP (Meng et al. 2022)", rome.ROMEHparams, rome_run("rome")),
        MethodInfo("r-rome", "r-ROME: ROME with consistent keys, no disabling edits (Gupta et al. 2024)",
                   rome.RROMEHparams, rome_run("r-rome")),
        MethodInfo("memit", "MEMIT: a batch of facts in one update spread over several MLPs (Meng et al. 2023)",
                   memit.MEMITHparams, lambda model, requests, hp: memit.apply_memit(model, requests, hp)),
        MethodInfo("alphaedit", "AlphaEdit: MEMIT confined to the null space of preserved and earlier keys (Fang et al. 2025)",
                   alphaedit.AlphaEditHparams, lambda model, requests, hp: alphaedit.apply_alphaedit(model, requests, hp)),
        MethodInfo("pmet", "PMET: MEMIT whose targets are the MLP's share, optimised beside attention's (Li et al. 2024)",
                   pmet.PMETHparams, lambda model, requests, hp: pmet.apply_pmet(model, requests, hp)),
        MethodInfo("emmet", "EMMET: batched ROME, every fact written exactly under an equality constraint (Gupta et al. 2024)",
                   emmet.EMMETHparams, lambda model, requests, hp: emmet.apply_emmet(model, requests, hp)),
        MethodInfo("kn", "KN: knowledge neurons by integrated gradients, edited or erased (Dai et al. 2022)",
                   kn.KNHparams, lambda model, requests, hp: kn.apply_kn(model, requests, hp)),
        MethodInfo("ft-l", "FT-L: constrained fine-tuning of one MLP matrix, prompt-last loss", ft.FTLHparams, ft_run("ft-l")),
        MethodInfo("ft-m", "FT-M: fine-tuning of one MLP matrix, masked teacher-forced loss", ft.FTMHparams, ft_run("ft-m")),
    ]
    return {i.name: i for i in infos}


_ALIASES = {"alpha-edit": "alphaedit", "alpha_edit": "alphaedit", "rrome": "r-rome", "r_rome": "r-rome", "ftl": "ft-l", "ft_l": "ft-l", "ftm": "ft-m", "ft_m": "ft-m", "ft": "ft-l"}


def get_method(name: str) -> MethodInfo:
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    table = _table()
    if key not in table:
        raise InvalidRequestError(f"Unknown method {name!r}; available: {', '.join(table)}.")
    return table[key]


def method_names() -> list[str]:
    return list(_table())
