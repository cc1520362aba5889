"""The job drivers: what each jobs/*.py calls. A driver builds its plan from pipeline/ stages, runs it inside the
run skeleton (run.py: directory, resolved config, Ray, coordinator, outcomes, summary) and writes its outputs.

    active.py      run_active: the online loop (jobs/active_train.py); dry_run.py: its --dry-run plan and memory
    filter.py      run_filter: one-shot scoring of a large pool, resumable per shard (jobs/filter.py)
    label_job.py   run_label: judge a selected set (jobs/label.py)
    supervised.py  run_supervised: stage-2 training on labelled rows (jobs/train.py)
    run_report.py  the active run's report (python -m actprm_ray.drivers.run_report RUN_DIR)
"""
