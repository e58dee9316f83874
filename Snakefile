"""llmpq workflow: tiny_model -> profile -> quantize -> calibrate -> ppl_map -> solve -> deploy (+ generate) -> evaluate."""

from snakemake.utils import min_version

min_version("9.0")


configfile: "conf/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/solve.smk"
include: "workflow/rules/deploy.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        all_targets(),
    default_target: True


onsuccess:
    for summary in sorted(RESULTS.glob("eval/*/*/*/summary.md")):
        print(summary.read_text())
    if paths.summary_path(RESULTS).is_file():
        print(f"Summary page: {paths.summary_path(RESULTS)}")
    print(f"Report: snakemake --cores {workflow.cores} --report report.html, then open report.html "
          f"(plots and tables also under {RESULTS / 'eval'}/)")


rule plan_only:
    """Plans for every paper cluster and its workloads from shapes alone (roofline latency, proxy sensitivity)."""
    input:
        plan_only_targets(),
