rule kg:
    output:
        files_in(
            "kg",
            "entities.parquet",
            "relations.parquet",
            "triples.parquet",
            "stats.json",
            "relation_frequency.csv",
        ),
    log:
        log_pattern("kg", R),
    conda:
        "../envs/mop.yaml"
    resources:
        **PLAN.resources("kg"),
    params:
        options=lambda w: as_json(PLAN.kg_options(w.kg)),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "mop kg --options {params.options:q} --out {params.out} 2> {log:q}"
