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
        "{params.cli} out={params.out} > {log} 2>&1"
