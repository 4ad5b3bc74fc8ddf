"""The ground floor: what every other package may import and which imports no other toollmm package
(paths, configuration, special tokens, batches, files, the one tool-call and ReAct parser)."""
