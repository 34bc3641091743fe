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


rule task_data:
    input:
        lambda w: task_files(w.task),
    output:
        expand(f"{R}/tasks/{{{{task}}}}/{{split}}.parquet", split=["train", "dev", "test"]),
        summary=f"{R}/tasks/{{task}}/summary.json",
    wildcard_constraints:
        task=r"hoc|bioasq7b|bioasq8b|mednli|medqa",
    params:
        options=lambda w: as_json(task_data_options(config, w.task)),
        out=lambda w: f"{R}/tasks/{w.task}",
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/tasks/{{task}}.log",
    shell:
        "mop task {wildcards.task} --options {params.options:q} --out {params.out} 2> {log:q}"


rule task_pubmedqa:
    input:
        lambda w: task_files("pubmedqa"),
    output:
        expand(f"{R}/tasks/pubmedqa/fold{{i}}/{{split}}.parquet", i=range(10),
               split=["train", "dev", "test"]),
        summary=f"{R}/tasks/pubmedqa/summary.json",
    params:
        options=lambda w: as_json(task_data_options(config, "pubmedqa")),
        out=f"{R}/tasks/pubmedqa",
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/tasks/pubmedqa.log",
    shell:
        "mop task pubmedqa --options {params.options:q} --out {params.out} 2> {log:q}"


rule encode:
    input:
        f"{R}/tasks/{{task}}/summary.json",
    output:
        f"{R}/encoded/{{task}}/{{tokenizer}}/len{{length}}/encoding.json",
    params:
        models=lambda w: models_json(),
        task_dir=lambda w: f"{R}/tasks/{w.task}",
        out=lambda w: f"{R}/encoded/{w.task}/{w.tokenizer}/len{w.length}",
    wildcard_constraints:
        tokenizer=r"[A-Za-z0-9][A-Za-z0-9._-]*",
        length=r"\d+",
    resources:
        **stage_resources("tokenize"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/encode/{{task}}/{{tokenizer}}/len{{length}}.log",
    shell:
        "mop encode --task {wildcards.task} --task-dir {params.task_dir}"
        " --model {wildcards.tokenizer} --models {params.models:q}"
        " --max-length {wildcards.length} --out {params.out} 2> {log:q}"


FINETUNE_OUTPUTS = ["metrics.json", "predictions.parquet"]


rule finetune_base:
    input:
        task=f"{R}/tasks/{{task}}/summary.json",
        encoded=lambda w: f"{encoded_root(w.task, w.model)}/encoding.json",
    output:
        [f"{R}/finetune/{{task}}/{{model}}/base/seed{{seed}}/{f}" for f in FINETUNE_OUTPUTS],
    params:
        options=lambda w: task_options(w.task),
        models=lambda w: models_json(),
        task_dir=lambda w: task_dir(w.task, w.seed),
        encoded=lambda w: encoded_dir(w.task, w.model, w.seed),
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
        " --options {params.options:q} --encoded {params.encoded} {RUNTIME}"
        " --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"


rule finetune_mop:
    input:
        task=f"{R}/tasks/{{task}}/summary.json",
        encoded=lambda w: f"{encoded_root(w.task, w.model)}/encoding.json",
        adapters=lambda w: [f"{d}/adapter.safetensors" for d in adapter_dirs(w.kg, w.k, w.scheme, w.model)],
    output:
        [
            f"{R}/finetune/{{task}}/{{model}}/mop-{{mixture}}/{{kg}}/k{{k}}-{{scheme}}/seed{{seed}}/{f}"
            for f in [*FINETUNE_OUTPUTS, "mixture.parquet"]
        ],
    params:
        options=lambda w: task_options(w.task),
        models=lambda w: models_json(),
        task_dir=lambda w: task_dir(w.task, w.seed),
        encoded=lambda w: encoded_dir(w.task, w.model, w.seed),
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
        " --options {params.options:q} --encoded {params.encoded} {RUNTIME}"
        " --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"


rule finetune_oracle:
    input:
        task=f"{R}/tasks/{{task}}/summary.json",
        encoded=lambda w: f"{encoded_root(w.task, w.model)}/encoding.json",
        adapters=lambda w: [f"{d}/adapter.safetensors" for d in adapter_dirs(w.kg, w.k, w.scheme, w.model)],
    output:
        [
            f"{R}/finetune/{{task}}/{{model}}/oracle/{{kg}}/k{{k}}-{{scheme}}/seed{{seed}}/{f}"
            for f in FINETUNE_OUTPUTS
        ],
    params:
        options=lambda w: task_options(w.task),
        models=lambda w: models_json(),
        task_dir=lambda w: task_dir(w.task, w.seed),
        encoded=lambda w: encoded_dir(w.task, w.model, w.seed),
        adapters=lambda w: " ".join(adapter_dirs(w.kg, w.k, w.scheme, w.model)),
        out=lambda w: f"{R}/finetune/{w.task}/{w.model}/oracle/{w.kg}/k{w.k}-{w.scheme}/seed{w.seed}",
        tags=lambda w: tags(stage="finetune", task=w.task, model=w.model, method="oracle",
                            kg=w.kg, k=w.k, scheme=w.scheme, seed=w.seed),
        name=lambda w: f"finetune {w.task} {w.model} oracle {w.kg} k{w.k}-{w.scheme} seed{w.seed}",
        experiment=config["experiment"],
    threads: res("finetune", "threads")
    resources:
        **stage_resources("finetune"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/finetune/{{task}}/{{model}}/oracle/{{kg}}/k{{k}}-{{scheme}}/seed{{seed}}.log",
    shell:
        "mop finetune --task {wildcards.task} --task-dir {params.task_dir} --method oracle"
        " --adapters {params.adapters}"
        " --model {wildcards.model} --models {params.models:q} --seed {wildcards.seed}"
        " --options {params.options:q} --encoded {params.encoded} {RUNTIME}"
        " --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"


rule probe_controls:
    input:
        task=f"{R}/tasks/probe/summary.json",
        adapters=lambda w: [f"{d}/adapter.safetensors" for d in adapter_dirs(w.kg, w.k, "metis", w.model)],
    output:
        metrics=f"{R}/finetune/probe/{{model}}/zeroshot/{{kg}}/k{{k}}-metis/seed0/metrics.json",
        baselines=f"{R}/finetune/probe/{{model}}/zeroshot/{{kg}}/k{{k}}-metis/seed0/baselines.json",
    params:
        options=lambda w: as_json(config["tasks"]["probe"]),
        models=lambda w: models_json(),
        kg=lambda w: f"{R}/kg/{w.kg}",
        partition=lambda w: f"{R}/partition/{w.kg}/k{w.k}-metis",
        adapters=lambda w: " ".join(str(Path(d).parent) for d in adapter_dirs(w.kg, w.k, "metis", w.model)),
        out=lambda w: f"{R}/finetune/probe/{w.model}/zeroshot/{w.kg}/k{w.k}-metis/seed0",
        tags=lambda w: tags(stage="finetune", task="probe", model=w.model, method="zeroshot",
                            kg=w.kg, k=w.k, scheme="metis", seed=0),
        name=lambda w: f"probe controls {w.model} {w.kg} k{w.k}",
        experiment=config["experiment"],
    threads: res("finetune", "threads")
    resources:
        **stage_resources("finetune"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/finetune/probe/{{model}}/zeroshot/{{kg}}/k{{k}}-metis.log",
    shell:
        "mop probe-controls --task-dir {R}/tasks/probe --kg {params.kg}"
        " --partition {params.partition} --adapters {params.adapters}"
        " --model {wildcards.model} --models {params.models:q} --options {params.options:q}"
        " {RUNTIME} --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"


rule finetune_adapter:
    input:
        task=f"{R}/tasks/{{task}}/summary.json",
        encoded=lambda w: f"{encoded_root(w.task, w.model)}/encoding.json",
        adapter=f"{R}/adapters/{{kg}}/k{{k}}-metis/{{model}}/p{{part}}/adapter/adapter.safetensors",
    output:
        [
            f"{R}/finetune/{{task}}/{{model}}/adapter/{{kg}}/k{{k}}-metis/p{{part}}/seed{{seed}}/{f}"
            for f in FINETUNE_OUTPUTS
        ],
    params:
        options=lambda w: task_options(w.task),
        models=lambda w: models_json(),
        task_dir=lambda w: task_dir(w.task, w.seed),
        encoded=lambda w: encoded_dir(w.task, w.model, w.seed),
        adapter=lambda w, input: str(Path(input.adapter).parent),
        out=lambda w: f"{R}/finetune/{w.task}/{w.model}/adapter/{w.kg}/k{w.k}-metis/p{w.part}/seed{w.seed}",
        tags=lambda w: tags(stage="finetune", task=w.task, model=w.model, method="adapter",
                            kg=w.kg, k=w.k, scheme="metis", partition=w.part, seed=w.seed),
        name=lambda w: f"finetune {w.task} {w.model} adapter {w.kg} k{w.k}-metis p{w.part} seed{w.seed}",
        experiment=config["experiment"],
    threads: res("finetune", "threads")
    resources:
        **stage_resources("finetune"),
    conda:
        "../envs/mop.yaml"
    log:
        f"{R}/logs/finetune/{{task}}/{{model}}/adapter/{{kg}}/k{{k}}-metis/p{{part}}/seed{{seed}}.log",
    shell:
        "mop finetune --task {wildcards.task} --task-dir {params.task_dir} --method adapter"
        " --adapters {params.adapter}"
        " --model {wildcards.model} --models {params.models:q} --seed {wildcards.seed}"
        " --options {params.options:q} --encoded {params.encoded} {RUNTIME}"
        " --threads {threads} --out {params.out}"
        " --experiment {params.experiment} --run-name {params.name:q} --tags {params.tags:q}"
        " --results {R} 2> {log:q}"
