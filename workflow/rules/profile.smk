rule profile:
    """Time one real decoder layer (and embed/head) of the model on one device type, at every bit-width."""
    input:
        weights=lambda wc: model_weights(wc.model),
    output:
        str(paths.profile_path(RESULTS, "{device}", "{model}")),
    params:
        cli=llmpq("profile"),
        device=lambda wc: timing_slice(wc.device),
        model=lambda wc: model_slice(wc.model),
        grid=config["profile"],
        kernels=kernel_table(),
        measures="layer grid, per-step overheads (loop, after-idle at a 2 ms gap), idle reference",  # what the table holds
        dtype=lambda wc: experiment(wc.model, "local-cpu").model.dtype,
    wildcard_constraints:
        device=r"(?!links/)[^/]+",
    log:
        "logs/profile/{device}/{model}.log",
    benchmark:
        "logs/benchmarks/profile/{device}/{model}.tsv"
    threads: workflow.cores
    resources:
        gpu=lambda wc: gpu_request(wc.device)["gpu"],
        gpu_model=lambda wc: gpu_request(wc.device)["gpu_model"],
        gres=lambda wc: gpu_request(wc.device)["gres"],
        slurm_partition=lambda wc: gpu_request(wc.device)["slurm_partition"],
        constraint=lambda wc: gpu_request(wc.device)["constraint"],
    conda:
        lambda wc: device_env(wc.device)
    shell:
        "{params.cli} device={wildcards.device} model={wildcards.model} out={output} 3>&2 > {log} 2>&1"


rule profile_links:
    """Time stage-to-stage transfers on a cluster that is present here."""
    output:
        str(paths.links_path(RESULTS, "{cluster}")),
    params:
        cli=llmpq("profile-links"),
        links=lambda wc: experiment(model_of_cluster(wc.cluster), wc.cluster).raw["cluster"],
        measures="idle ping-pong and busy exchange per payload",  # what the table holds
    log:
        "logs/profile_links/{cluster}.log",
    benchmark:
        "logs/benchmarks/profile_links/{cluster}.tsv"
    threads: workflow.cores
    conda:
        lambda wc: cluster_env(model_of_cluster(wc.cluster), wc.cluster)
    shell:
        "{params.cli} cluster={wildcards.cluster} out={output} 3>&2 > {log} 2>&1"
