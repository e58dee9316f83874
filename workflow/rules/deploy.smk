rule deploy:
    """Run a plan: one process per stage (torchrun locally; under the SLURM executor one SLURM job of its own,
    heterogeneous where the plan needs it, submitted and waited for from here), measured per phase."""
    input:
        plan=str(paths.plan_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}")),
        manifests=lambda wc: quant_manifests(wc.model),
        weights=lambda wc: model_weights(wc.model),
    output:
        str(paths.run_path(RESULTS, "{model}", "{cluster}", "{workload}", "{solver}")),
    params:
        cli=llmpq("deploy"),
        config=lambda wc: {"devices": without_slurm(experiment(wc.model, wc.cluster, wc.workload).raw["devices"]),
                           "workload": experiment(wc.model, wc.cluster, wc.workload).raw["workload"],
                           "kernels": experiment(wc.model, wc.cluster, wc.workload).raw["kernels"]},
        deploy=config["deploy"],
    log:
        "logs/deploy/{model}/{cluster}/{workload}/{solver}.log",
    benchmark:
        "logs/benchmarks/deploy/{model}/{cluster}/{workload}/{solver}.tsv"
    # all cores locally, so that nothing disturbs the stages' clocks; one under SLURM, where it only waits
    threads: lambda wc: 1 if plan_launcher() == "sbatch" else workflow.cores
    # Stays on the submitting host under the SLURM executor: the plugin builds no heterogeneous jobs, so the
    # verb submits the plan's job itself (sbatch, polled until it ends) and streams its output into the log.
    localrule: True
    resources:
        launcher=lambda wc: plan_launcher(),
        slurm_job=lambda wc, input: plan_slurm_job(input.plan, "deploy"),
    conda:
        lambda wc: cluster_env(wc.model, wc.cluster)
    shell:
        "{params.cli} model={wildcards.model} cluster={wildcards.cluster} workload={wildcards.workload} "
        "deploy.launcher={resources.launcher} plan={input.plan} out={output} 3>&2 > {log} 2>&1"
