"""scaling: hyperparameter and scaling studies of contrastive pretraining (Ray Train + Tune, Optuna, MLflow)."""

import os

# A driver that starts its own local Ray and gets SIGTERM (`scaling stop`, `ray job stop`: SIGKILL follows
# 3 s later) would otherwise wait up to 30 s for that node to drain -- a Kubernetes feature -- and be
# killed before it could close the study's MLflow runs. Read by Ray when it is imported, so set first.
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
