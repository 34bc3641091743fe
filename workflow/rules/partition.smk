rule partition:
    input:
        triples=f"{R}/kg/{{kg}}/triples.parquet",
    output:
        membership=f"{R}/partition/{{kg}}/k{{k}}-{{scheme}}/membership.parquet",
        triples=f"{R}/partition/{{kg}}/k{{k}}-{{scheme}}/triples.parquet",
        stats=f"{R}/partition/{{kg}}/k{{k}}-{{scheme}}/stats.json",
    params:
        options=lambda w: partition_options(),
        shuffle=lambda w: shuffle_rate(w.scheme),
        kg=lambda w: f"{R}/kg/{w.kg}",
        out=lambda w: f"{R}/partition/{w.kg}/k{w.k}-{w.scheme}",
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/partition/{{kg}}/k{{k}}-{{scheme}}.log",
    resources:
        **stage_resources("partition"),
    shell:
        "mop partition --kg {params.kg} --k {wildcards.k} --shuffle {params.shuffle}"
        " --options {params.options:q} --out {params.out} 2> {log:q}"
