"""The generic trainer: no algorithm is named here.

- ``env``: the run's mesh, tokenizer, model definition and batch sharding.
- ``loop``: the step loop (resume, periodic and SIGTERM checkpoints, metrics).
- ``checkpoint``, ``metrics_writer``: orbax and metrics files.
- ``optim``: optimisers and schedules.
- ``config``: validation of the generic keys; algorithms add their own rules
  (``recipes``).
- ``sft``: the reference's supervised stage.
- ``inputs``: the providers of the ``SequenceStats`` fields a prior reads.
- ``pairs``: pair-major batches of preference pairs, their statistics, the
  loss and the jitted preference steps.
- ``reference_cache``: the reference's log-probs, computed once.
- ``recipes``: what an algorithm adds (how its prior's parameters move, its
  procedure, its config block and rules), each with a default.
- ``preference``: the generic round runner, baselines and restore.
- ``export``: the final policy in Hugging Face format.

Modules are imported explicitly (``from midpo.training import loop``).
"""
