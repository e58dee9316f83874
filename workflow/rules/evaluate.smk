def figure(model, cluster, workload, name):
    """A figure of the evaluation of one model x cluster x workload."""
    return str(paths.eval_path(RESULTS, model, cluster, workload).with_suffix("") / name)


def solvers_of(model, cluster, workload):
    return [s for m, c, w, s in experiments() if (m, c, w) == (model, cluster, workload)]


rule evaluate:
    """Compare every method's plan and run: measured vs predicted, perplexity, memory; plots."""
    input:
        profiles=lambda wc: profiles_for(wc.model, wc.cluster),
        weights=lambda wc: model_weights(wc.model),
        plans=lambda wc: [str(paths.plan_path(RESULTS, wc.model, wc.cluster, wc.workload, s))
                          for s in solvers_of(wc.model, wc.cluster, wc.workload)],
        runs=lambda wc: [str(paths.run_path(RESULTS, wc.model, wc.cluster, wc.workload, s))
                         for s in solvers_of(wc.model, wc.cluster, wc.workload)],
        generated=lambda wc: generate_outputs(wc.model, wc.cluster, wc.workload,
                                              solvers_of(wc.model, wc.cluster, wc.workload)),
    output:
        table=str(paths.eval_path(RESULTS, "{model}", "{cluster}", "{workload}")),
        summary=figure("{model}", "{cluster}", "{workload}", "summary.md"),
        stages=figure("{model}", "{cluster}", "{workload}", "stages.parquet"),
        plan=report(figure("{model}", "{cluster}", "{workload}", "plan.png"), caption="../report/plan.rst",
                    category="Plans", subcategory="{model} / {cluster} / {workload}"),
        throughput=report(figure("{model}", "{cluster}", "{workload}", "throughput.png"),
                          caption="../report/throughput.rst", category="Throughput",
                          subcategory="{model} / {cluster} / {workload}"),
        fidelity=report(figure("{model}", "{cluster}", "{workload}", "fidelity.png"), caption="../report/fidelity.rst",
                        category="Cost model", subcategory="{model} / {cluster} / {workload}"),
        quality=report(figure("{model}", "{cluster}", "{workload}", "quality.png"), caption="../report/quality.rst",
                       category="Quality", subcategory="{model} / {cluster} / {workload}"),
    params:
        cli=llmpq("evaluate"),
        eval=config["eval"],
        device=config["calibration"]["device"],
    resources:
        mem_mb=lambda wc, input: quality_resources(wc.model, "evaluate")["mem_mb"],
        runtime=lambda wc, input: quality_resources(wc.model, "evaluate")["runtime"],
        gpu=lambda wc, input: quality_resources(wc.model, "evaluate")["gpu"],
    log:
        "logs/evaluate/{model}/{cluster}/{workload}.log",
    benchmark:
        "logs/benchmarks/evaluate/{model}/{cluster}/{workload}.tsv"
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} model={wildcards.model} cluster={wildcards.cluster} workload={wildcards.workload} "
        "out={output.table} 3>&2 > {log} 2>&1"


rule summary:
    """One page with every experiment's comparison table, plan figure and why the fastest plan wins."""
    input:
        evals=lambda wc: eval_targets(),
    output:
        page=report(str(paths.summary_path(RESULTS)), caption="../report/summary.rst", category="1. Summary"),
        body=str(paths.summary_path(RESULTS).with_suffix(".body.html")),  # embedded in the report's first page
    params:
        cli=llmpq("summary"),
    log:
        "logs/summary.log",
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} out={output.page} 3>&2 > {log} 2>&1"
