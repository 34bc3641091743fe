# Downstream tasks: prepared splits, their tokens, and the fine-tuning runs of every method.


rule task_probe:
    input:
        entities=lambda w: PLAN.path(
            Run("kg", kg=config["tasks"]["probe"]["kg"]), "entities.parquet"
        ),
        membership=lambda w: PLAN.path(
            Run(
                "partition",
                kg=config["tasks"]["probe"]["kg"],
                k=config["tasks"]["probe"]["k"],
                scheme="metis",
            ),
            "membership.parquet",
        ),
        inside_at=lambda w: [
            PLAN.path(
                Run("partition", kg=config["tasks"]["probe"]["kg"], k=k, scheme="metis"),
                "membership.parquet",
            )
            for k in config["tasks"]["probe"]["inside_at"]
        ],
    output:
        files_in(
            "task",
            "train.parquet",
            "dev.parquet",
            "test.parquet",
            "summary.json",
        ),
    log:
        log_pattern("task", R),
    wildcard_constraints:
        task="probe",
    conda:
        "../envs/mop.yaml"
    params:
        options=lambda w: as_json(PLAN.task_data_options("probe")),
        kg=lambda w, input: os.path.dirname(input.entities),
        partition=lambda w, input: os.path.dirname(input.membership),
        inside_at=lambda w, input: " ".join(os.path.dirname(f) for f in input.inside_at),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "mop task --kg {params.kg} --partition {params.partition}"
        " --inside-at {params.inside_at} --options {params.options:q} --out {params.out}"
        " 2> {log:q}"


rule task_data:
    input:
        lambda w: task_files(w.task),
    output:
        files_in(
            "task",
            "train.parquet",
            "dev.parquet",
            "test.parquet",
            "summary.json",
        ),
    log:
        log_pattern("task", R),
    wildcard_constraints:
        task="hoc|bioasq7b|bioasq8b|mednli|medqa",
    conda:
        "../envs/mop.yaml"
    params:
        options=lambda w: as_json(PLAN.task_data_options(w.task)),
        out=lambda w, output: os.path.dirname(output[-1]),
    shell:
        "mop task --options {params.options:q} --out {params.out} 2> {log:q}"


use rule task_data as task_pubmedqa with:
    output:
        expand(
            pattern("task", "fold{i}/{split}.parquet", R),
            i=range(10),
            split=["train", "dev", "test"],
            allow_missing=True,
        ),
        summary=pattern("task", "summary.json", R),
    wildcard_constraints:
        task="pubmedqa",
    params:
        options=lambda w: as_json(PLAN.task_data_options("pubmedqa")),
        out=lambda w, output: os.path.dirname(output.summary),


for _task, _src in PLAN.downloads().items():

    rule:
        name:
            f"download_{_task}"
        output:
            _src["out"],
        log:
            Run("download", task=_task).log(R),
        conda:
            "../envs/mop.yaml"
        params:
            url=_src["url"],
            sha256=_src["sha256"],
        shell:
            "mop download --url {params.url:q} --sha256 {params.sha256} --out {output:q}"
            " 2> {log:q}"


rule encode:
    input:
        pattern("task", "summary.json", R),
    output:
        pattern("encoded", "encoding.json", R),
    log:
        log_pattern("encoded", R),
    conda:
        "../envs/mop.yaml"
    resources:
        **PLAN.resources("tokenize"),
    params:
        models=models_json,
        task_dir=lambda w, input: os.path.dirname(input[0]),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "mop encode --task-dir {params.task_dir} --models {params.models:q}"
        " --out {params.out} 2> {log:q}"


rule link:
    input:
        task=pattern("task", "summary.json", R),
        kg=pattern("kg", "entities.parquet", R),
        membership=pattern("partition", "membership.parquet", R),
    output:
        files_in("links", "links.parquet", "coverage.json"),
    log:
        log_pattern("links", R),
    conda:
        "../envs/mop.yaml"
    params:
        options=lambda w: as_json(config["linking"]),
        task_dir=lambda w, input: os.path.dirname(input.task),
        kg=lambda w, input: os.path.dirname(input.kg),
        partition=lambda w, input: os.path.dirname(input.membership),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "mop link --task-dir {params.task_dir} --kg {params.kg} --partition {params.partition}"
        " --options {params.options:q} --out {params.out} 2> {log:q}"


rule finetune_base:
    input:
        unpack(finetune_inputs),
    output:
        files_in("base", *FINETUNE),
    log:
        log_pattern("base", R),
    conda:
        "../envs/mop.yaml"
    threads: PLAN.resource("finetune", "threads")
    resources:
        **PLAN.resources("finetune"),
    params:
        options=lambda w: as_json(PLAN.finetune_options(Run.of("base", w))),
        models=models_json,
        task_dir=lambda w: PLAN.task_folder(w.task, w.seed),
        encoded=lambda w: PLAN.encoded_folder(w.task, w.model, w.seed),
        adapters="",
        links=lambda w, input: f"--links {input.links}" if "links" in input.keys() else "",
        partition=lambda w, input: (
            f"--partition {os.path.dirname(input.membership)}"
            if "membership" in input.keys()
            else ""
        ),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "mop finetune --task-dir {params.task_dir} --encoded {params.encoded} {params.adapters}"
        " {params.links} {params.partition} --models {params.models:q} --options {params.options:q}"
        " --threads {threads} --out {params.out} 2> {log:q}"


use rule finetune_base as finetune_mop with:
    input:
        unpack(finetune_inputs),
        adapters=adapter_files,
    output:
        files_in("mop", *FINETUNE, "mixture.parquet"),
    log:
        log_pattern("mop", R),
    params:
        options=lambda w: as_json(PLAN.finetune_options(Run.of("mop", w))),
        adapters=lambda w, input: f"--adapters {folders(input.adapters)}",


use rule finetune_mop as finetune_oracle with:
    output:
        files_in("oracle", *FINETUNE),
    log:
        log_pattern("oracle", R),
    params:
        options=lambda w: as_json(PLAN.finetune_options(Run.of("oracle", w))),


use rule finetune_mop as finetune_adapter with:
    input:
        unpack(finetune_inputs),
        adapters=lambda w: adapter_files(w)[int(w.part) : int(w.part) + 1],
    output:
        files_in("single", *FINETUNE),
    log:
        log_pattern("single", R),
    params:
        options=lambda w: as_json(PLAN.finetune_options(Run.of("single", w))),


use rule finetune_mop as finetune_subset with:
    input:
        unpack(finetune_inputs),
        selection=lambda w: checkpoints.select_subsets.get(
            task=w.task, model=w.model, kg=w.kg, k=w.k, scheme="metis"
        ).output[0],
        adapters=subset_adapter_files,
    output:
        files_in("subset", *FINETUNE, "mixture.parquet"),
    log:
        log_pattern("subset", R),
    params:
        options=lambda w: as_json(PLAN.finetune_options(Run.of("subset", w))),


rule probe_controls:
    input:
        task=pattern("task", "summary.json", R),
        kg=pattern("kg", "entities.parquet", R),
        membership=pattern("partition", "membership.parquet", R),
        adapters=adapter_files,
    output:
        files_in("zeroshot", "metrics.json", "baselines.json"),
    log:
        log_pattern("zeroshot", R),
    conda:
        "../envs/mop.yaml"
    threads: PLAN.resource("finetune", "threads")
    resources:
        **PLAN.resources("finetune"),
    params:
        options=lambda w: as_json({"relation": config["tasks"]["probe"]["relation"]}),
        models=models_json,
        kg=lambda w, input: os.path.dirname(input.kg),
        partition=lambda w, input: os.path.dirname(input.membership),
        task_dir=lambda w, input: os.path.dirname(input.task),
        adapters=lambda w, input: " ".join(
            os.path.dirname(os.path.dirname(a)) for a in input.adapters
        ),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "mop probe-controls --task-dir {params.task_dir} --kg {params.kg}"
        " --partition {params.partition} --adapters {params.adapters}"
        " --models {params.models:q} --options {params.options:q} --threads {threads}"
        " --out {params.out} 2> {log:q}"
