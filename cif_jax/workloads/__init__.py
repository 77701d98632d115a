"""The workloads behind the main job and the experiments: models, data, training, folds, statistics, the CLI."""
