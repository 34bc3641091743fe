rule task_probe:
    input:
        entities=lambda w: f"{R}/kg/{config['tasks']['probe']['kg']}/entities.parquet",
        membership=lambda w: f"{R}/partition/{config['tasks']['probe']['kg']}/"
        f"k{config['tasks']['probe']['k']}-metis/membership.parquet",
    output:
        expand(f"{R}/tasks/probe/{{split}}.parquet", split=["train", "dev", "test"]),
        summary=f"{R}/tasks/probe/summary.json",
    params:
        options=lambda w: as_json(config["tasks"].get("probe", {})),
        kg=lambda w, input: str(Path(input.entities).parent),
        partition=lambda w, input: str(Path(input.membership).parent),
        out=f"{R}/tasks/probe",
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/tasks/probe.log",
    shell:
        "mop task probe --kg {params.kg} --partition {params.partition}"
        " --options {params.options:q} --out {params.out} 2> {log:q}"


FINETUNE_OUTPUTS = ["metrics.json", "predictions.parquet"]


rule finetune_base:
    input:
        task=f"{R}/tasks/{{task}}/summary.json",
    output:
        [f"{R}/finetune/{{task}}/{{model}}/base/seed{{seed}}/{f}" for f in FINETUNE_OUTPUTS],
    params:
        options=lambda w: as_json(FT),
        models=lambda w: models_json(),
        task_dir=lambda w: f"{R}/tasks/{w.task}",
        out=lambda w: f"{R}/finetune/{w.task}/{w.model}/base/seed{w.seed}",
        tags=lambda w: tags(stage="finetune", task=w.task, model=w.model, method="base",
                            seed=w.seed),
        name=lambda w: f"finetune {w.task} {w.model} base seed{w.seed}",
        experiment=config["experiment"],
    threads: res("finetune", "threads")
    resources:
        **stage_resources("finetune"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/finetune/{{task}}/{{model}}/base/seed{{seed}}.log",
    shell:
        "mop finetune --task {wildcards.task} --task-dir {params.task_dir} --method base"
        " --model {wildcards.model} --models {params.models:q} --seed {wildcards.seed}"
        " --options {params.options:q} --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"


rule finetune_mop:
    input:
        task=f"{R}/tasks/{{task}}/summary.json",
        adapters=lambda w: [f"{d}/adapter.safetensors" for d in adapter_dirs(w.kg, w.k, w.scheme, w.model)],
    output:
        [
            f"{R}/finetune/{{task}}/{{model}}/mop-{{mixture}}/{{kg}}/k{{k}}-{{scheme}}/seed{{seed}}/{f}"
            for f in [*FINETUNE_OUTPUTS, "mixture.parquet"]
        ],
    params:
        options=lambda w: as_json(FT),
        models=lambda w: models_json(),
        task_dir=lambda w: f"{R}/tasks/{w.task}",
        adapters=lambda w: " ".join(adapter_dirs(w.kg, w.k, w.scheme, w.model)),
        out=lambda w: f"{R}/finetune/{w.task}/{w.model}/mop-{w.mixture}/{w.kg}/k{w.k}-{w.scheme}/seed{w.seed}",
        tags=lambda w: tags(stage="finetune", task=w.task, model=w.model, method="mop",
                            mixture=w.mixture, kg=w.kg, k=w.k, scheme=w.scheme, seed=w.seed),
        name=lambda w: f"finetune {w.task} {w.model} mop-{w.mixture} {w.kg} k{w.k}-{w.scheme} seed{w.seed}",
        experiment=config["experiment"],
    threads: res("finetune", "threads")
    resources:
        **stage_resources("finetune"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/finetune/{{task}}/{{model}}/mop-{{mixture}}/{{kg}}/k{{k}}-{{scheme}}/seed{{seed}}.log",
    shell:
        "mop finetune --task {wildcards.task} --task-dir {params.task_dir} --method mop"
        " --mixture {wildcards.mixture} --adapters {params.adapters}"
        " --model {wildcards.model} --models {params.models:q} --seed {wildcards.seed}"
        " --options {params.options:q} --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"
