ruleorder: tiny_model > import_model


rule import_model:
    """Convert a model's source (a GGUF file, e.g. inside an installed package) into an HF directory, once."""
    output:
        config=str(paths.imported_model_dir(RESULTS, "{model}") / "config.json"),
    params:
        cli=llmpq("import-model"),
        source=lambda wc: model_slice(wc.model)["source"],
    log:
        "logs/import_model/{model}.log",
    benchmark:
        "logs/benchmarks/import_model/{model}.tsv"
    resources:
        mem_mb=lambda wc: import_request(wc.model)["mem_mb"],
        runtime=lambda wc: import_request(wc.model)["runtime"],
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} model={wildcards.model} 3>&2 > {log} 2>&1"


rule tiny_model:
    """Train the embedded tiny OPT and its tokenizer on shipped public-domain text."""
    output:
        config=str(paths.tiny_model_dir(RESULTS) / "config.json"),
    params:
        cli=llmpq("tiny-model"),
        out=str(paths.tiny_model_dir(RESULTS)),
        source=config["tiny_model"]["source"],
    log:
        "logs/tiny_model.log",
    benchmark:
        "logs/benchmarks/tiny_model.tsv"
    threads: workflow.cores
    conda:
        "../../envs/llmpq.yaml"
    shell:
        "{params.cli} out={params.out} 3>&2 > {log} 2>&1"
