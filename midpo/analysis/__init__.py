"""Loading, tabulating and plotting the results of midpo runs (used by
``notebooks/inspect_runs.ipynb``): ``runs`` (loading), ``tables``, ``plots``.

A run's workdir holds ``metrics.jsonl`` (one row per logged step and stage),
``eval.json`` and ``eval_samples.jsonl`` (the evaluation), ``config.json`` and
orbax checkpoints under ``sft/`` and ``checkpoints/``. Everything here is a
pure function of those files:

* ``load_run(workdir)`` / ``load_runs(workdirs)`` read one or several runs into
  plain dicts; whatever is missing or unreadable becomes an entry of the run's
  ``notes`` (never a silent gap).
* ``summary_table(runs)`` compares the evaluations (NaN where a run has none,
  with the reason in its ``notes`` column); ``format_summary`` writes
  ``mean ± se`` strings for display.
* ``curve``, ``curve_stages``, ``plot_curves``: learning curves per stage.
* ``plot_reward_vs_kl``: the true reward against KL(policy || reference), one
  point per run and the references at KL 0, with standard errors.
* ``prior_table``, ``plot_prior_stats``: the ``prior/*`` metrics.
* ``samples_table``: sampled responses of the policy and the reference.
* ``checkpoint_steps``, ``checkpoint_table``: checkpoint steps found on disk.

Figures are ``matplotlib.figure.Figure`` objects built without ``pyplot``, so
the module works under any backend (Agg included) and keeps no global figure
state. Whatever a figure leaves out is written under it as a footnote.
"""

from midpo.analysis.plots import (DEFAULT_CURVES, PRIOR_STAGE_CURVES, figure_notes, plot_curves,
                                  plot_prior_stats, plot_reward_vs_kl)
from midpo.analysis.runs import (NO_CONFIG_NOTE, NO_EVAL_NOTE, NO_METRICS_NOTE, NO_SAMPLES_NOTE,
                                 checkpoint_steps, load_run, load_runs, read_metrics)
from midpo.analysis.tables import (SUMMARY_COLUMNS, checkpoint_table, curve, curve_stages,
                                   format_summary, notes_table, prior_label, prior_table,
                                   run_label, samples_table, summary_table)

__all__ = [
    "DEFAULT_CURVES", "NO_CONFIG_NOTE", "NO_EVAL_NOTE", "NO_METRICS_NOTE", "NO_SAMPLES_NOTE",
    "PRIOR_STAGE_CURVES", "SUMMARY_COLUMNS", "checkpoint_steps", "checkpoint_table", "curve",
    "curve_stages", "figure_notes", "format_summary", "load_run", "load_runs", "notes_table",
    "plot_curves", "plot_prior_stats", "plot_reward_vs_kl", "prior_label", "prior_table",
    "read_metrics", "run_label", "samples_table", "summary_table",
]
