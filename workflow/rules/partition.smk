rule partition:
    input:
        pattern("kg", "triples.parquet", R),
    output:
        files_in(
            "partition",
            "membership.parquet",
            "triples.parquet",
            "stats.json",
        ),
    log:
        log_pattern("partition", R),
    conda:
        "../envs/mop.yaml"
    resources:
        **PLAN.resources("partition"),
    params:
        options=lambda w: as_json(PLAN.partition_options()),
        kg=lambda w, input: os.path.dirname(input[0]),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "mop partition --kg {params.kg} --options {params.options:q} --out {params.out}"
        " 2> {log:q}"
