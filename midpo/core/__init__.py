"""Pure JAX: no config, no I/O.

- ``stats``: per-token statistics from logits (label log-probs, both KLs), and
  ``SequenceStats``, what a prior reads about one side of a batch of pairs.
- ``priors``: the ``Prior`` base class and its registry (the published priors
  are in ``midpo.algorithms``).
- ``losses``: the MI-DPO loss and its links.
"""
