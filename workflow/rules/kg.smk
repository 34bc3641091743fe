rule kg:
    output:
        entities=f"{R}/kg/{{kg}}/entities.parquet",
        relations=f"{R}/kg/{{kg}}/relations.parquet",
        triples=f"{R}/kg/{{kg}}/triples.parquet",
        stats=f"{R}/kg/{{kg}}/stats.json",
        relation_frequency=f"{R}/kg/{{kg}}/relation_frequency.csv",
    params:
        options=lambda w: as_json(config["kgs"][w.kg]),
        out=lambda w: f"{R}/kg/{w.kg}",
        tags=lambda w: tags(stage="kg", kg=w.kg),
        experiment=config["experiment"],
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/kg/{{kg}}.log",
    resources:
        **stage_resources("kg"),
    shell:
        "mop kg --name {wildcards.kg} --options {params.options:q} --out {params.out}"
        " --experiment {params.experiment} --tags {params.tags:q} --results {R} 2> {log:q}"
