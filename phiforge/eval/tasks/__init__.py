"""One small module per benchmark. Each defines OUTPUT (how the harness runs it), DEFAULT_FEWSHOT and
`load(data_dir, num_fewshot, seed) -> list[dict]`; generative ones also `score(docs, outputs) -> list[dict]`.
The harness finds a task by its module name (`phiforge.eval.tasks.<name>`)."""
