rule calibrate:
    """Per-layer x bit-width sensitivity indicators from calibration activations and the quantized layers."""
    input:
        weights=lambda wc: model_weights(wc.model),
        manifests=lambda wc: quant_manifests(wc.model),
    output:
        str(paths.sensitivity_path(RESULTS, "{model}")),
    params:
        cli=llmpq("calibrate"),
        calibration=config["calibration"],
        sensitivity=lambda wc: sensitivity_slice(wc.model),
        bits=lambda wc: model_slice(wc.model)["bits"],
    resources:
        mem_mb=lambda wc, input: quality_resources(wc.model, "calibrate")["mem_mb"],
        runtime=lambda wc, input: quality_resources(wc.model, "calibrate")["runtime"],
        gpu=lambda wc, input: quality_resources(wc.model, "calibrate")["gpu"],
    log:
        "logs/calibrate/{model}.log",
    benchmark:
        "logs/benchmarks/calibrate/{model}.tsv"
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} model={wildcards.model} out={output} 3>&2 > {log} 2>&1"


rule ppl_map:
    """Fit summed sensitivity -> measured perplexity increase on random mixed-bit plans."""
    input:
        sensitivity=str(paths.sensitivity_path(RESULTS, "{model}")),
        manifests=lambda wc: quant_manifests(wc.model),
        weights=lambda wc: model_weights(wc.model),
    output:
        str(paths.ppl_map_path(RESULTS, "{model}")),
    params:
        cli=llmpq("ppl-map"),
        eval=config["eval"],
        sensitivity=lambda wc: sensitivity_slice(wc.model),
        device=config["calibration"]["device"],
    resources:
        mem_mb=lambda wc, input: quality_resources(wc.model, "ppl_map")["mem_mb"],
        runtime=lambda wc, input: quality_resources(wc.model, "ppl_map")["runtime"],
        gpu=lambda wc, input: quality_resources(wc.model, "ppl_map")["gpu"],
    log:
        "logs/ppl_map/{model}.log",
    benchmark:
        "logs/benchmarks/ppl_map/{model}.tsv"
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} model={wildcards.model} out={output} 3>&2 > {log} 2>&1"
