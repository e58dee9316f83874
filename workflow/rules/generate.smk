rule generate:
    """The batch job: every prompt of the workload's prompts file through the plan, one JSONL completion each.

    Completions accumulate in <out>.partial (not an output, so Snakemake keeps it when a job is killed) and
    a rerun resumes from it; an output made from another plan or prompts file is started over.
    """
    input:
        plan=str(paths.plan_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}")),
        prompts=lambda wc: prompts_file_of(wc.model, wc.cluster, wc.workload),
        manifests=lambda wc: quant_manifests(wc.model),
        weights=lambda wc: model_weights(wc.model),
    output:
        completions=str(paths.output_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}")),
        runs=str(paths.output_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}").with_suffix(".runs.parquet")),
    params:
        cli=llmpq("generate"),
        config=lambda wc: {"devices": without_slurm(experiment(wc.model, wc.cluster, wc.workload).raw["devices"]),
                           "workload": experiment(wc.model, wc.cluster, wc.workload).raw["workload"],
                           "kernels": experiment(wc.model, wc.cluster, wc.workload).raw["kernels"]},
        prompts_sha256=lambda wc: prompts_sha256(wc.model, wc.cluster, wc.workload),
        generate=config["generate"],
    log:
        "logs/generate/{model}/{cluster}/{workload}/{solver}.log",
    benchmark:
        "logs/benchmarks/generate/{model}/{cluster}/{workload}/{solver}.tsv"
    threads: workflow.cores
    resources:
        tasks=lambda wc, input: len(plan_devices(input.plan)),
        cpus_per_task=lambda wc, input: stage_cpus(input.plan),
        mpi=lambda wc, input: "srun" if len(plan_devices(input.plan)) > 1 else "",
        gpu=lambda wc, input: generate_gpu_request(input.plan)["gpu"],
        gpu_model=lambda wc, input: generate_gpu_request(input.plan)["gpu_model"],
        gres=lambda wc, input: generate_gpu_request(input.plan)["gres"],
    conda:
        lambda wc: cluster_env(wc.model, wc.cluster)
    shell:
        "{params.cli} model={wildcards.model} cluster={wildcards.cluster} workload={wildcards.workload} "
        "plan={input.plan} out={output.completions} generate.on_change=restart 3>&2 > {log} 2>&1"
