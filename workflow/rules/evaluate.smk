def solvers_of(model, cluster, workload):
    return [s for m, c, w, s in experiments() if (m, c, w) == (model, cluster, workload)]


rule evaluate:
    """Compare every method's plan and run: measured vs predicted, perplexity, memory; plots."""
    input:
        plans=lambda wc: [str(paths.plan_path(RESULTS, wc.model, wc.cluster, wc.workload, s))
                          for s in solvers_of(wc.model, wc.cluster, wc.workload)],
        runs=lambda wc: [str(paths.run_path(RESULTS, wc.model, wc.cluster, wc.workload, s))
                         for s in solvers_of(wc.model, wc.cluster, wc.workload)],
    output:
        str(paths.eval_path(RESULTS, "{model}", "{cluster}", "{workload}")),
    params:
        cli=llmpq("evaluate"),
        eval=config["eval"],
    log:
        "logs/evaluate/{model}/{cluster}/{workload}.log",
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} model={wildcards.model} cluster={wildcards.cluster} workload={wildcards.workload} "
        "out={output} > {log} 2>&1"
