"""Optuna side of olmopt: storages, campaign plans, stage drivers and workers. Only search/ imports optuna."""

import warnings

from optuna.exceptions import ExperimentalWarning

# set_metric_names and fail_stale_trials are stable in practice; olmopt drives heartbeats itself
# (its own pop/ask loop records them), so Optuna's "use heartbeats with optimize" hint does not apply.
warnings.filterwarnings("ignore", category=ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
