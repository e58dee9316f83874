rule solve:
    """Plan partition, per-layer bits and micro-batches for one model x cluster x workload x method.

    A method that cannot fit (memory or quality budget) writes its infeasibility as its plan (infeasible=record):
    deploy and generate skip it, evaluate lists it, the other methods go on.
    """
    input:
        profiles=lambda wc: profiles_for(wc.model, wc.cluster),
        links=lambda wc: links_for(wc.cluster),
        quality=lambda wc: quality_inputs(wc.model),
        weights=lambda wc: model_weights(wc.model),
        prompts=lambda wc: prompts_file_of(wc.model, wc.cluster, wc.workload),
    output:
        plan=str(paths.plan_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}")),
        layers=str(paths.plan_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}").with_suffix(".parquet")),
    params:
        cli=llmpq("solve"),
        config=lambda wc: {k: experiment(wc.model, wc.cluster, wc.workload, wc.solver).raw[k]
                           for k in ("cluster", "devices", "workload", "solver", "kernels")},
        model=lambda wc: model_slice(wc.model),
        dtype=lambda wc: experiment(wc.model, "local-cpu").model.dtype,
        prompts_sha256=lambda wc: prompts_sha256(wc.model, wc.cluster, wc.workload),
    log:
        "logs/solve/{model}/{cluster}/{workload}/{solver}.log",
    benchmark:
        "logs/benchmarks/solve/{model}/{cluster}/{workload}/{solver}.tsv"
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} model={wildcards.model} cluster={wildcards.cluster} workload={wildcards.workload} "
        "solver={wildcards.solver} out={output.plan} infeasible=record 3>&2 > {log} 2>&1"
