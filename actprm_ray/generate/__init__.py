"""Policy rollouts (METHOD §8): problems -> trajectories in the pool-row schema, generated on Ray.

    rollouts.py   what a rollout is, with no engine: problems, chat prompts, seeds, pool rows (pure)
    shards.py     the output folder: shards of problems, atomic shard files, completion records, resume
    processor.py  the engine: ray.data.llm build_processor + vLLMEngineProcessorConfig, results per shard
    job.py        run_generate (jobs/generate.py): plan -> skip finished shards -> generate the rest -> summary
"""
