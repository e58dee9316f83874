rule deploy:
    """Run a plan: one process per stage (torchrun locally, srun under SLURM), measured per phase."""
    input:
        plan=str(paths.plan_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}")),
        manifests=lambda wc: quant_manifests(wc.model),
        weights=lambda wc: model_weights(wc.model),
    output:
        str(paths.run_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}")),
    params:
        cli=llmpq("deploy"),
        config=lambda wc: {k: experiment(wc.model, wc.cluster, wc.workload).raw[k]
                           for k in ("devices", "workload", "kernels")},
        deploy=config["deploy"],
    log:
        "logs/deploy/{model}/{cluster}/{workload}/{solver}.log",
    benchmark:
        "logs/benchmarks/deploy/{model}/{cluster}/{workload}/{solver}.tsv"
    threads: workflow.cores
    resources:
        tasks=lambda wc, input: len(plan_devices(input.plan)),
        cpus_per_task=lambda wc, input: stage_cpus(input.plan),
        # the SLURM plugin refuses an MPI job of one task (and then hangs): a one-stage plan runs in-process
        mpi=lambda wc, input: "srun" if len(plan_devices(input.plan)) > 1 else "",
        gpu=lambda wc, input: deploy_gpu_request(input.plan)["gpu"],
        gpu_model=lambda wc, input: deploy_gpu_request(input.plan)["gpu_model"],
        gres=lambda wc, input: deploy_gpu_request(input.plan)["gres"],
    conda:
        lambda wc: cluster_env(wc.model, wc.cluster)
    shell:
        "{params.cli} model={wildcards.model} cluster={wildcards.cluster} workload={wildcards.workload} "
        "plan={input.plan} out={output} > {log} 2>&1"
