"""How fast: the quota's shape and estimator, the gate, quotas learned by earlier runs."""
