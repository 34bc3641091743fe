# Which partitions matter: rank the single-adapter runs, MoP over subsets, partition topics.


checkpoint select_subsets:
    input:
        single_runs_of,
    output:
        f"{R}/analysis/{{task}}/{{model}}/{{kg}}/k{{k}}-metis/subsets.json",
    params:
        subsets=lambda w: as_json(AN["subsets"]),
        rank_by=AN["rank_by"],
    log:
        f"{R}/logs/analysis/{{task}}/{{model}}/{{kg}}/k{{k}}-metis/subsets.log",
    shell:
        "mop select-subsets --runs {input} --subsets {params.subsets:q} --k {wildcards.k}"
        " --rank-by {params.rank_by} --out {output:q} 2> {log:q}"


rule finetune_subset:
    input:
        task=f"{R}/tasks/{{task}}/summary.json",
        encoded=lambda w: f"{encoded_root(w.task, w.model)}/encoding.json",
        selection=lambda w: checkpoints.select_subsets.get(
            task=w.task, model=w.model, kg=w.kg, k=w.k
        ).output[0],
        adapters=lambda w: [f"{d}/adapter.safetensors" for d in subset_adapter_dirs(w)],
    output:
        [
            f"{R}/finetune/{{task}}/{{model}}/mop-{{mixture}}/{{kg}}/k{{k}}-metis/subset-{{subset}}/seed{{seed}}/{f}"
            for f in [*FINETUNE_OUTPUTS, "mixture.parquet"]
        ],
    wildcard_constraints:
        subset=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    params:
        options=lambda w: task_options(w.task),
        models=lambda w: models_json(),
        task_dir=lambda w: task_dir(w.task, w.seed),
        encoded=lambda w: encoded_dir(w.task, w.model, w.seed),
        adapters=lambda w: " ".join(subset_adapter_dirs(w)),
        out=lambda w: f"{R}/finetune/{w.task}/{w.model}/mop-{w.mixture}/{w.kg}/k{w.k}-metis/subset-{w.subset}/seed{w.seed}",
        tags=lambda w: tags(
            stage="finetune", task=w.task, model=w.model, method="mop", mixture=w.mixture,
            kg=w.kg, k=w.k, scheme="metis", subset=w.subset, seed=w.seed,
            partitions=subset_partitions(w),
        ),
        name=lambda w: f"finetune {w.task} {w.model} mop-{w.mixture} {w.kg} k{w.k}-metis {w.subset} seed{w.seed}",
        experiment=config["experiment"],
    threads: res("finetune", "threads")
    resources:
        **stage_resources("finetune"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/finetune/{{task}}/{{model}}/mop-{{mixture}}/{{kg}}/k{{k}}-metis/subset-{{subset}}/seed{{seed}}.log",
    shell:
        "mop finetune --task {wildcards.task} --task-dir {params.task_dir} --method mop"
        " --mixture {wildcards.mixture} --adapters {params.adapters}"
        " --model {wildcards.model} --models {params.models:q} --seed {wildcards.seed}"
        " --options {params.options:q} --encoded {params.encoded} {RUNTIME}"
        " --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"


rule topics:
    input:
        entities=f"{R}/kg/{{kg}}/entities.parquet",
        membership=f"{R}/partition/{{kg}}/k{{k}}-metis/membership.parquet",
    output:
        terms=f"{R}/topics/{{kg}}/k{{k}}-metis/terms.csv",
        groups=f"{R}/topics/{{kg}}/k{{k}}-metis/groups.csv",
        png=report(f"{R}/topics/{{kg}}/k{{k}}-metis/wordclouds.png",
                   caption="../report/topics.rst", category="Partition topics"),
        pdf=f"{R}/topics/{{kg}}/k{{k}}-metis/wordclouds.pdf",
    params:
        kg=lambda w, input: str(Path(input.entities).parent),
        partition=lambda w, input: str(Path(input.membership).parent),
        groups=AN.get("topics", {}).get("groups", 6),
        terms=AN.get("topics", {}).get("terms", 20),
        seed=AN.get("topics", {}).get("seed", 0),
        out=lambda w: f"{R}/topics/{w.kg}/k{w.k}-metis",
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/topics/{{kg}}/k{{k}}-metis.log",
    shell:
        "mop topics --kg {params.kg} --partition {params.partition} --groups {params.groups}"
        " --terms {params.terms} --seed {params.seed} --out {params.out} 2> {log:q}"
