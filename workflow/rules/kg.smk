rule kg:
    output:
        multiext(
            pattern("kg", "", R) + "/",
            "entities.parquet",
            "relations.parquet",
            "triples.parquet",
            "stats.json",
            "relation_frequency.csv",
        ),
    params:
        options=lambda w: as_json(PLAN.kg_options(w.kg)),
        out=lambda w, output: os.path.dirname(output[0]),
    resources:
        **stage_resources("kg"),
    conda:
        "../envs/mop.yaml"
    log:
        log_pattern("kg", R),
    shell:
        "mop kg --options {params.options:q} --out {params.out} 2> {log:q}"
