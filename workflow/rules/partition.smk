rule partition:
    input:
        pattern("kg", "triples.parquet", R),
    output:
        multiext(
            pattern("partition", "", R) + "/", "membership.parquet", "triples.parquet", "stats.json"
        ),
    params:
        options=lambda w: as_json(PLAN.partition_options()),
        kg=lambda w, input: os.path.dirname(input[0]),
        out=lambda w, output: os.path.dirname(output[0]),
    resources:
        **stage_resources("partition"),
    conda:
        "../envs/mop.yaml"
    log:
        log_pattern("partition", R),
    shell:
        "mop partition --kg {params.kg} --options {params.options:q} --out {params.out}"
        " 2> {log:q}"
