"""Data layer: the generic log format, MovieLens-100k, the lifelong generator, datasets.

Modules: `logs` (load_log, LogData, LogFormatError), `columns` (file reading and column
checks), `items` (item -> category table), `movielens` (prepare), `synthetic`
(generate), `sampling` (implicit negatives), `dataset` (build_dataset -> UserBatches).
Nothing is imported here, so that `ifa-rank data ...` does not load torch.
"""
