"""gm's pipeline: what is about runs rather than models. gmlib holds the models and their
measurements; this package records and schedules the runs that use them:
  runlog      the record of one notebook stage in results/<run>/ (params, metrics.json, tables, figures)
  records     metrics.json's and summary.json's entries of an evaluation (notebook 05)
  eval_parts  an evaluation run in parts that merge
  report      the Results tables from the records (notebook 07)
  plan        a plan of notebook jobs over the machine's GPUs (scripts/run_experiment.py)
  live        a training curve redrawn in the notebook while a model trains
It imports gmlib; gmlib never imports it."""
