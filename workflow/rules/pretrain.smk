rule tokenize:
    input:
        pattern("kg", "triples.parquet", R),
    output:
        pattern("tokens", "", R),
    log:
        log_pattern("tokens", R),
    conda:
        "../envs/mop.yaml"
    resources:
        **PLAN.resources("tokenize"),
    params:
        options=lambda w: as_json(PLAN.tokenize_options()),
        models=models_json,
        kg=lambda w, input: os.path.dirname(input[0]),
    shell:
        "mop tokenize --kg {params.kg} --models {params.models:q} --options {params.options:q}"
        " --out {output:q} 2> {log:q}"


rule pretrain:
    input:
        kg=pattern("kg", "entities.parquet", R),
        tokens=pattern("tokens", "", R),
        membership=pattern("partition", "membership.parquet", R),
    output:
        adapter=pattern("adapter", "adapter/adapter.safetensors", R),
        head=pattern("adapter", "head.safetensors", R),
        metrics=pattern("adapter", "metrics.json", R),
    log:
        log_pattern("adapter", R),
    conda:
        "../envs/mop.yaml"
    threads: PLAN.resource("pretrain", "threads")
    resources:
        **PLAN.resources("pretrain"),
    params:
        options=lambda w: as_json(PLAN.pretrain_options()),
        models=models_json,
        kg=lambda w, input: os.path.dirname(input.kg),
        partition=lambda w, input: os.path.dirname(input.membership),
        out=lambda w, output: os.path.dirname(output.metrics),
    shell:
        "mop pretrain --kg {params.kg} --tokens {input.tokens:q} --partition {params.partition}"
        " --models {params.models:q} --options {params.options:q} --threads {threads}"
        " --out {params.out} 2> {log:q}"
