"""The one-off work of locate-and-edit methods: context templates and key statistics (C0).

Both are computed once per model and cached; ROME-style methods declare them through
their ``prepare`` so the CLI can run them up front and say what they cost.
"""
from __future__ import annotations

from typing import Any

from lmpatch.methods.registry import OneOff
from lmpatch.model.loading import LoadedModel


def locate_one_offs(model: LoadedModel, hp: Any, layers: list[int]) -> list[OneOff]:
    """Templates for ``hp``, and C0 for ``layers`` when ``hp.mom2_adjustment`` is set."""
    from lmpatch.methods.locate.templates import context_templates, template_file
    from lmpatch.stats import StatsConfig

    tconfig = hp.template_config()
    jobs = [
        OneOff(
            what="sampling context templates for this model",
            where=template_file(model, tconfig),
            done=lambda: template_file(model, tconfig).is_file(),
            run=lambda show: context_templates(model, tconfig),
        )
    ]
    if hp.mom2_adjustment:
        jobs.append(covariance_one_off(model, layers, StatsConfig(corpus=hp.stats_corpus, n_tokens=hp.stats_tokens)))
    return jobs


def covariance_one_off(model: LoadedModel, layers: list[int], config: Any) -> OneOff:
    """C0 of the MLP output's keys at ``layers`` (a :class:`lmpatch.stats.StatsConfig`), computed
    in one pass over the corpus for the layers not cached yet."""
    from lmpatch.stats import second_moments, stats_path

    def missing() -> list[int]:
        return [layer for layer in layers if not stats_path(model, layer, config).is_file()]

    plural = "s" if len(layers) > 1 else ""
    return OneOff(
        what=f"key statistics for layer{plural} {', '.join(map(str, layers))} over "
             f"{config.n_tokens:,} tokens of {config.corpus}",
        where=stats_path(model, layers[0], config).parent,
        done=lambda: not missing(),
        run=lambda show: second_moments(model, missing(), config, progress=show),
        draws_progress=True,
    )
