rule tokenize:
    input:
        triples=f"{R}/kg/{{kg}}/triples.parquet",
    output:
        f"{R}/tokens/{{kg}}/{{model}}.parquet",
    params:
        models=lambda w: models_json(),
        kg=lambda w: f"{R}/kg/{w.kg}",
        max_length=config["pretrain"]["max_length"],
        bidirectional="--bidirectional" if config["pretrain"]["bidirectional"] else "",
    resources:
        **stage_resources("tokenize"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/tokenize/{{kg}}/{{model}}.log",
    shell:
        "mop tokenize --kg {params.kg} --model {wildcards.model} --models {params.models:q}"
        " --max-length {params.max_length} {params.bidirectional} --out {output:q} 2> {log:q}"


rule pretrain:
    input:
        tokens=f"{R}/tokens/{{kg}}/{{model}}.parquet",
        membership=f"{R}/partition/{{kg}}/k{{k}}-{{scheme}}/membership.parquet",
    output:
        adapter=f"{R}/adapters/{{kg}}/k{{k}}-{{scheme}}/{{model}}/p{{part}}/adapter/adapter.safetensors",
        head=f"{R}/adapters/{{kg}}/k{{k}}-{{scheme}}/{{model}}/p{{part}}/head.safetensors",
        metrics=f"{R}/adapters/{{kg}}/k{{k}}-{{scheme}}/{{model}}/p{{part}}/metrics.json",
    params:
        options=lambda w: as_json(config["pretrain"]),
        models=lambda w: models_json(),
        kg=lambda w: f"{R}/kg/{w.kg}",
        partition=lambda w: f"{R}/partition/{w.kg}/k{w.k}-{w.scheme}",
        out=lambda w: f"{R}/adapters/{w.kg}/k{w.k}-{w.scheme}/{w.model}/p{w.part}",
        tags=lambda w: tags(stage="pretrain", kg=w.kg, k=w.k, scheme=w.scheme,
                            model=w.model, partition=w.part),
        name=lambda w: f"pretrain {w.kg} k{w.k}-{w.scheme} {w.model} p{w.part}",
        experiment=config["experiment"],
    threads: res("pretrain", "threads")
    resources:
        **stage_resources("pretrain"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/pretrain/{{kg}}/k{{k}}-{{scheme}}/{{model}}/p{{part}}.log",
    shell:
        "mop pretrain --kg {params.kg} --tokens {input.tokens:q} --partition {params.partition}"
        " --part {wildcards.part} --model {wildcards.model} --models {params.models:q}"
        " --options {params.options:q} {RUNTIME} --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"
