# Which partitions matter: rank the single-adapter runs, MoP over subsets, partition topics.


checkpoint select_subsets:
    input:
        lambda w: PLAN.metrics(PLAN.single_runs(w.task, w.model, w.kg)),
    output:
        pattern("selection", "subsets.json", R),
    log:
        log_pattern("selection", R),
    conda:
        "../envs/mop.yaml"
    params:
        subsets=lambda w: as_json(config["analysis"]["subsets"]),
        rank_by=config["analysis"]["rank_by"],
    shell:
        "mop select-subsets --runs {input} --subsets {params.subsets:q}"
        " --rank-by {params.rank_by} --out {output:q} 2> {log:q}"


rule topics:
    input:
        kg=pattern("kg", "entities.parquet", R),
        membership=pattern("partition", "membership.parquet", R),
    output:
        files_in("topics", "terms.csv", "groups.csv"),
    log:
        log_pattern("topics", R),
    conda:
        "../envs/mop.yaml"
    params:
        options=lambda w: as_json(config["analysis"].get("topics", {})),
        kg=lambda w, input: os.path.dirname(input.kg),
        partition=lambda w, input: os.path.dirname(input.membership),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "mop topics --kg {params.kg} --partition {params.partition}"
        " --options {params.options:q} --out {params.out} 2> {log:q}"
