"""Export a plan to an inference engine (vLLM, SGLang): its exact weights as one GPTQModel-format model
directory, the per-layer bits as `dynamic` rules, the partition and micro-batches as launch settings.

`engine` holds the rules an engine's fast path imposes (imported by the planner; no torch);
`checkpoint` assembles the model directory from the per-layer stores; `launch` writes the launch
scripts and the directory's README; `run` is the `llmpq export` verb.
"""
