"""Seeing whether training works: validation loss (``validation``), trackers and run folders (``tracker``), the
per-step monitor behind the progress bar (``monitor``), the end-of-run summary, loss plot and contact sheets
(``report``) and the ``--show_timesteps`` histogram (``timestep_report``)."""
