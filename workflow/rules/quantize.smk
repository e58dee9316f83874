rule quantize:
    """Quantize every decoder layer of a model to one bit-width, one file per layer plus a manifest."""
    input:
        weights=lambda wc: model_weights(wc.model),
    output:
        manifest=str(paths.quant_manifest_path(RESULTS, "{model}", "{scheme}", "{bits}")),
    params:
        cli=llmpq("quantize"),
        quant=lambda wc: model_slice(wc.model)["quant"],
        calibration=config["calibration"],
    wildcard_constraints:
        bits=r"\d+",
    resources:
        mem_mb=lambda wc, input: quality_resources(wc.model, "quantize")["mem_mb"],
        runtime=lambda wc, input: quality_resources(wc.model, "quantize")["runtime"],
        gpu=lambda wc, input: quality_resources(wc.model, "quantize")["gpu"],
    log:
        "logs/quantize/{model}/{scheme}-w{bits}.log",
    benchmark:
        "logs/benchmarks/quantize/{model}/{scheme}-w{bits}.tsv"
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} model={wildcards.model} model.quant.scheme={wildcards.scheme} bits={wildcards.bits} "
        "3>&2 > {log} 2>&1"
