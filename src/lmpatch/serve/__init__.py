"""The live-edit service (``lmpatch serve``): OpenAI-compatible generation on a model whose
edits are kept in a durable ledger and can be made and reverted while it runs.

Modules, each with one job: :mod:`~lmpatch.serve.ledger` (SQLite), :mod:`~lmpatch.serve.state`
(the served copy and its twin, the swap), :mod:`~lmpatch.serve.worker` (the one writer),
:mod:`~lmpatch.serve.generation` (one request's decoding), :mod:`~lmpatch.serve.service`
(start-up and recovery), :mod:`~lmpatch.serve.app` (the HTTP routes), ``static/`` (the page).
"""
